//! The status page in a real browser: Debian's headless Chromium, driven by chromedriver over the
//! W3C WebDriver protocol (plain JSON over loopback HTTP), against a live cluster with a finished
//! and a running job. A missing browser or driver fails the test; it is never skipped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skep_integration::{Cluster, PoolOpts, assert_success, children_of, events, kill};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The whole test, cluster start included, must end within this.
const LIMIT: Duration = Duration::from_secs(60);
/// How long the guard waits for the browser to close before it kills it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The W3C WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[test]
fn the_status_page_shows_nodes_and_jobs_in_a_headless_browser() {
    let until = Instant::now() + LIMIT;
    for p in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(p).is_file(),
            "{p} is missing: run scripts/install-deps.sh (it installs Debian's chromium and \
             chromium-driver)"
        );
    }
    // Two slots: one job runs for the whole test while the other finishes.
    let opts = PoolOpts {
        workers: 2,
        tps: 20.0,
        ..PoolOpts::default()
    };
    let c = Cluster::start_with(&["--http-listen", "127.0.0.1:0"], opts);
    let base = c.http_url();
    let addr = base.trim_start_matches("http://").to_owned();
    let admin = c.admin_token();

    // The snapshot needs a token, and an admin one.
    let r = request(&addr, "GET", "/status.json", None, None, until);
    assert_eq!(r.status, 401, "no token: {}", r.body);
    let out = c
        .cli()
        .args(["token", "create", "--role", "submit"])
        .output()
        .expect("run skep token create");
    assert_success(&out);
    let submit = String::from_utf8(out.stdout).expect("UTF-8 token");
    let r = request(
        &addr,
        "GET",
        "/status.json",
        Some(submit.trim()),
        None,
        until,
    );
    assert_eq!(r.status, 403, "submit token: {}", r.body);
    assert!(r.body.contains("needs an admin token"), "{}", r.body);
    let r = request(&addr, "GET", "/", None, None, until);
    assert_eq!(r.status, 200);
    for h in [
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "content-security-policy: default-src 'none'; script-src 'sha256-",
    ] {
        assert!(r.headers.contains(h), "{h} missing from {}", r.headers);
    }

    // One job done, one running.
    let out = c.submit("synthetic", "30s", 4, "a finished job");
    assert_success(&out);
    let done = events(&out);
    let done_id = done[0]["job_id"].as_str().expect("job id").to_owned();
    let node_id = done[0]["node_id"].as_str().expect("node id").to_owned();
    assert_eq!(done.last().expect("events")["event"], "done", "{done:?}");
    let mut running = c.spawn_submit("5m", 2000, "a job that keeps running");
    running.wait_for("token");
    let running_id = running.job_id();
    // And one refused at admission: 2000 tokens at 20 per second cannot finish in a second.
    let out = c.submit("synthetic", "1s", 2000, "a job that cannot finish in time");
    assert!(!out.status.success(), "an infeasible job was admitted");

    let b = Browser::start(&c.dir, until);
    b.call("POST", "/url", json!({ "url": format!("{base}/") }));
    let field = b.find("#token");
    b.call(
        "POST",
        &format!("/element/{field}/value"),
        json!({ "text": admin }),
    );
    let show = b.find("#save");
    b.call("POST", &format!("/element/{show}/click"), json!({}));

    // Bounded polling of the DOM until the page has rendered what the queen knows.
    let row = |rows: &Value, id: &str| -> Option<Vec<String>> {
        rows.as_array()?
            .iter()
            .map(|r| serde_json::from_value::<Vec<String>>(r.clone()).unwrap_or_default())
            .find(|r| r.first().map(String::as_str) == Some(id))
    };
    let (dom, node, job) = loop {
        let dom = b.call(
            "POST",
            "/execute/sync",
            json!({ "script": READ_DOM, "args": [] }),
        );
        let node = row(&dom["nodes"], &node_id);
        let job = row(&dom["jobs"], &done_id);
        let live = row(&dom["jobs"], &running_id);
        let refused = row(&dom["refusals"], "infeasible");
        if let (Some(node), Some(job), Some(live)) = (node, job, live)
            && node.get(2).map(String::as_str) == Some("healthy")
            && job.get(2).map(String::as_str) == Some("done")
            && live.get(2).map(String::as_str) == Some("running")
            && refused.and_then(|r| r.get(1).cloned()).as_deref() == Some("1")
        {
            break (dom, node, job);
        }
        assert!(
            Instant::now() < until,
            "the page never showed node {node_id} healthy, job {done_id} done, job {running_id} running \
             and one infeasible refusal: {dom}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(node[3], "synthetic", "{node:?}");
    assert_eq!(job[1], "synthetic", "{job:?}");
    assert_eq!(job[3], node_id, "{job:?}");
    assert_eq!(dom["error"], "", "{dom}");
    // The token lives in sessionStorage only: not a cookie, not in the URL, not in the field.
    assert_eq!(dom["stored"], true, "{dom}");
    assert_eq!(dom["cookie"], "", "{dom}");
    assert_eq!(dom["url"], format!("{base}/"), "{dom}");
    assert_eq!(dom["field"], "", "{dom}");

    let png = c.dir.join("status-page.png");
    let shot = b.call("GET", "/screenshot", Value::Null);
    let bytes = base64_decode(shot.as_str().expect("screenshot"));
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(&png, bytes).expect("write the screenshot");
    println!(
        "screenshot: {} (kept with SKEP_KEEP_TEST_DIRS=1)",
        png.display()
    );
    drop(b);
    let _ = running.child.kill();
    let _ = running.child.wait();
}

/// The page's tables as text, cell by cell, and where it keeps the token.
const READ_DOM: &str = r##"
const rows = (id) => Array.from(document.querySelectorAll("#" + id + " tbody tr"))
  .map((tr) => Array.from(tr.cells).map((td) => td.textContent));
return {
  nodes: rows("nodes"), jobs: rows("jobs"), refusals: rows("refusals"),
  error: document.getElementById("error").textContent,
  stored: sessionStorage.getItem("skep-status-token") !== null,
  cookie: document.cookie, url: location.href,
  field: document.getElementById("token").value,
};
"##;

// === Browser ===

/// chromedriver and its headless Chromium session; dropping it closes both, even when the test
/// failed.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    until: Instant,
}

impl Browser {
    #[track_caller]
    fn start(dir: &Path, until: Instant) -> Browser {
        // A free loopback port for the driver (it listens on loopback only by default).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.join("chromedriver.log"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver,
            addr: format!("127.0.0.1:{port}"),
            session: String::new(),
            until,
        };
        loop {
            let ready = TcpStream::connect(&b.addr).is_ok()
                && request(&b.addr, "GET", "/status", None, None, until).json()["value"]["ready"]
                    == true;
            if ready {
                break;
            }
            assert!(Instant::now() < until, "chromedriver never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = dir.join("chromium-profile");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--window-size=1200,720",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let r = request(&b.addr, "POST", "/session", None, Some(&caps), until);
        let v = r.json();
        assert_eq!(r.status, 200, "new session: {v}");
        b.session = v["value"]["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        b
    }

    /// One WebDriver command on the session; its `value`.
    #[track_caller]
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (!body.is_null()).then_some(&body);
        let r = request(&self.addr, method, &path, None, body, self.until);
        let mut v = r.json();
        assert_eq!(r.status, 200, "{method} {path}: {v}");
        v["value"].take()
    }

    /// The element matching a CSS selector.
    #[track_caller]
    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({ "using": "css selector", "value": css }),
        );
        v[ELEMENT].as_str().expect("an element").to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let soon = Instant::now() + CLOSE_GRACE;
            // Best effort: the guard must not panic while a failed test unwinds.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                request(&self.addr, "DELETE", &path, None, None, soon)
            }));
        }
        for pid in children_of(self.driver.id(), "chromium") {
            kill(pid);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

// === HTTP/1.1 over loopback ===

struct Reply {
    status: u16,
    /// Response headers, names and values lower-cased.
    headers: String,
    body: String,
}

impl Reply {
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One request on its own connection, answered by `until`.
#[track_caller]
fn request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
    until: Instant,
) -> Reply {
    let left = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let sock = addr.parse().expect("a socket address");
    let mut conn = TcpStream::connect_timeout(&sock, left).expect("connect");
    conn.set_read_timeout(Some(left)).expect("read timeout");
    conn.set_write_timeout(Some(left)).expect("write timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())
        .and_then(|()| conn.write_all(body.as_bytes()))
        .expect("send the request");
    // Read until the body is complete: a server may keep the connection open regardless.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (head, mut body) = loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let body = &raw[split + 4..];
            let complete = if head.contains("transfer-encoding: chunked") {
                body.ends_with(b"0\r\n\r\n")
            } else if let Some(len) = content_length(&head) {
                body.len() >= len
            } else {
                false
            };
            if complete {
                break (head, body.to_vec());
            }
        }
        let n = conn.read(&mut buf).expect("read the response");
        if n == 0 {
            let split = raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a complete response head");
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            break (head, raw[split + 4..].to_vec());
        }
        raw.extend_from_slice(&buf[..n]);
    };
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    Reply {
        status,
        headers: head,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// The `content-length` in a lower-cased response head.
fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The body of a chunked transfer encoding.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    out
}

/// Standard base64 (WebDriver screenshots).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | (u32::from(d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
