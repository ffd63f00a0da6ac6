//! The daemons' front door, before any handler runs: the bad-credential penalty box (which must
//! never refuse a valid caller), coalesced auditing of refused calls, connection limits and
//! timeouts, and requests that do not decode.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prost::bytes::{Buf, BufMut};
use skep_integration::{Cluster, PoolOpts, audit_text, runtime, wait_until};
use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::pool_client::PoolClient;
use skep_proto::v1::{ListJobsRequest, QueenFrame};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Request, Status};

/// `msg` with `authorization: Bearer <token>`.
fn as_caller<T>(token: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn admin_token(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.token_file())
        .unwrap()
        .trim()
        .to_owned()
}

/// A well-formed token nobody issued, different for each `i`.
fn bad_token(i: usize) -> String {
    format!("skep_{i:064x}")
}

/// The `auth.failure` entries of an audit log, as JSON.
fn auth_failures(dir: &std::path::Path) -> Vec<serde_json::Value> {
    audit_text(dir)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "auth.failure")
        .collect()
}

#[test]
fn valid_callers_are_not_refused_while_bad_tokens_flood_from_their_address() {
    // The pool, the CLI, the admin and the flood all speak from 127.0.0.1. The pool streams 40
    // tokens at 20/s: its job runs for about two seconds, all of it under the flood.
    let cluster = Cluster::start_with(
        &["--bad-auth-limit", "3/1m"],
        PoolOpts {
            tps: 20.0,
            ..PoolOpts::default()
        },
    );
    let mut job = cluster.spawn_submit("60s", 40, "keep streaming");
    job.wait_for("token");

    let stop = Arc::new(AtomicBool::new(false));
    let queen_url = cluster.queen_url.clone();
    let flood = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            runtime().block_on(async move {
                let mut jobs = JobsClient::connect(queen_url).await.unwrap();
                let mut codes = Vec::new();
                // Until the job is over, bounded all the same.
                while !stop.load(Ordering::Relaxed) && codes.len() < 20_000 {
                    let req = as_caller(&bad_token(codes.len()), ListJobsRequest { limit: 1 });
                    let err = jobs.list(req).await.expect_err("a bad token was accepted");
                    codes.push(err.code());
                }
                codes
            })
        }
    });
    // The bad tokens reach the penalty box before the admin and the job are looked at again.
    let audit_dir = cluster.dir.join("queen").join("audit");
    wait_until("the flood to be refused", || {
        !auth_failures(&audit_dir).is_empty()
    });
    // An admin call from the flooded address gets through...
    assert_eq!(
        cluster.healthy_nodes(),
        Ok(1),
        "the admin (or the pool's heartbeats) refused"
    );
    // ...and so does a submit token's job, streamed to its end, which needs the pool on the
    // same address to keep heartbeating (a node that stops is declared dead and its job fails).
    let (code, events) = job.finish();
    stop.store(true, Ordering::Relaxed);
    let codes = flood.join().unwrap();
    assert_eq!(code, Some(0), "the running job failed: {events:?}");
    assert_eq!(events.last().unwrap()["event"], "done", "{events:?}");
    assert_eq!(cluster.healthy_nodes(), Ok(1));

    // The flood itself met the penalty box: its first three failures are UNAUTHENTICATED, the
    // rest RESOURCE_EXHAUSTED (with a retry hint).
    assert!(codes.len() > 3, "the flood made only {} calls", codes.len());
    assert!(
        codes[..3].iter().all(|c| *c == Code::Unauthenticated),
        "{:?}",
        &codes[..3]
    );
    assert!(
        codes[3..].iter().all(|c| *c == Code::ResourceExhausted),
        "a penalised source was answered otherwise"
    );
}

#[test]
fn refused_calls_at_the_pool_are_throttled_and_audited_once_per_interval() {
    const CALLS: usize = 300;
    let cluster = Cluster::start(PoolOpts {
        extra_args: ["--bad-auth-limit", "5/1m", "--refusal-audit-interval", "1s"]
            .map(String::from)
            .to_vec(),
        ..PoolOpts::default()
    });
    let pool_addr = std::fs::read_to_string(cluster.pools[0].dir.join("listen.addr")).unwrap();
    let started = Instant::now();
    let codes = runtime().block_on(async {
        let mut pool = PoolClient::connect(format!("http://{}", pool_addr.trim()))
            .await
            .unwrap();
        let mut codes = Vec::new();
        for i in 0..CALLS {
            let frames = tokio_stream::iter(Vec::<QueenFrame>::new());
            let req = as_caller(&bad_token(i), frames);
            let Err(status) = pool.session(req).await else {
                panic!("the pool opened a session for a made-up key");
            };
            codes.push(status.code());
        }
        codes
    });
    let elapsed = started.elapsed();
    assert!(codes[..5].iter().all(|c| *c == Code::Unauthenticated));
    assert!(codes[5..].iter().all(|c| *c == Code::ResourceExhausted));
    // The queen, on the same address, is not refused.
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 2, "still served"));

    // Every refused call is accounted for, in a handful of entries: one when the source starts
    // being refused, then one per interval (a window may run up to one more tick) with a count.
    let audit_dir = cluster.pools[0].dir.join("audit");
    let total = |entries: &[serde_json::Value]| -> u64 {
        entries
            .iter()
            .map(|e| {
                e["fields"]["count"]
                    .as_u64()
                    .expect("every entry has a count")
            })
            .sum()
    };
    wait_until(
        "every refused call to be counted in the pool's audit log",
        || total(&auth_failures(&audit_dir)) == CALLS as u64,
    );
    let entries = auth_failures(&audit_dir);
    let bound = 3 + 2 * elapsed.as_secs() as usize;
    assert!(
        entries.len() <= bound,
        "{} audit entries for {CALLS} refused calls in {elapsed:?} (at most {bound})",
        entries.len()
    );
    let admin = admin_token(&cluster);
    assert!(!audit_text(&audit_dir).contains(&admin));
}

/// Reads until the server closes the connection (EOF or reset); false if it is still open after
/// `within`.
fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            // A server may send its own preface first; it is the close that counts.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_connections_are_closed_and_a_submit_still_gets_through() {
    // A bounded slowloris: 300 connections that never send a byte, against a queen that admits
    // 200 connections and gives each 2 s for its preface.
    let cluster = Cluster::start_with(
        &["--max-connections", "200", "--preface-timeout", "2s"],
        PoolOpts::default(),
    );
    let addr = cluster.queen_url.trim_start_matches("http://").to_owned();
    let mut silent: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // A normal client still gets in (a silent connection makes room for it) and is served.
    skep_integration::assert_success(&cluster.submit("synthetic", "20s", 3, "through the crowd"));
    // Every silent connection is closed by the server: the older ones to make room, the rest
    // when their preface time is up.
    for (i, conn) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(conn, skep_integration::WAIT),
            "silent connection {i} is still open"
        );
    }
    // And the queen still serves afterwards.
    skep_integration::assert_success(&cluster.submit("synthetic", "20s", 2, "after the crowd"));
}

/// Sends raw bytes as the request message and ignores whatever comes back: for requests that do
/// not decode, which no typed client can produce.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        buf.advance(buf.remaining());
        Ok(Some(()))
    }
}

#[test]
fn requests_that_do_not_decode_are_invalid_argument_and_audited() {
    let cluster = Cluster::start(PoolOpts::default());
    let admin = admin_token(&cluster);
    // Field 1 of each request is a string (`job_id`, `model`).
    let cases: [(&str, &str, Vec<u8>); 3] = [
        // Invalid UTF-8 in a string field.
        (
            "/skep.v1.Jobs/Get",
            "invalid UTF-8",
            vec![0x0a, 0x02, 0xff, 0xfe],
        ),
        // A varint where a string belongs.
        ("/skep.v1.Jobs/Get", "wrong wire type", vec![0x08, 0x01]),
        // The server-streaming Submit decodes its request before any handler too.
        (
            "/skep.v1.Jobs/Submit",
            "invalid UTF-8",
            vec![0x0a, 0x01, 0xc3],
        ),
    ];
    runtime().block_on(async {
        let channel = cluster.channel().await.unwrap();
        for (path, what, bytes) in cases {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let path = PathAndQuery::from_static(path);
            let req = as_caller(&admin, bytes);
            let status = if path.path().ends_with("Submit") {
                match grpc.server_streaming(req, path.clone(), RawCodec).await {
                    Ok(mut s) => s.get_mut().message().await.map(|_| ()),
                    Err(e) => Err(e),
                }
            } else {
                grpc.unary(req, path.clone(), RawCodec).await.map(|_| ())
            }
            .expect_err("a request that does not decode was accepted");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} with {what}: {}",
                status.message()
            );
        }
    });
    // Audited like any other rejected input, under the caller's fingerprint.
    let fp = skep_common::auth::fingerprint(&admin);
    let audit_dir = cluster.dir.join("queen").join("audit");
    wait_until("the undecodable requests in the queen's audit log", || {
        audit_text(&audit_dir)
            .lines()
            .filter(|l| {
                l.contains("validation.rejected")
                    && l.contains("does not decode")
                    && l.contains(&fp)
            })
            .count()
            == 3
    });
    // The queen still serves.
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 2, "still fine"));
}
