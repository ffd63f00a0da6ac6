//! `skep`: submit jobs to a queen and inspect the cluster.
//!
//! Exit status is a contract scripts rely on (see `exit`): 0 done, 2 usage or invalid argument,
//! 3 deadline exceeded, 4 rejected for capacity or rate limit, 5 unauthenticated or permission
//! denied, 6 unavailable, 1 anything else.

mod approve;
mod audit;
mod exit;
mod models;
mod progress;
mod prompt;
mod render;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use skep_common::auth;
use skep_common::sampling::Sampling;
use skep_common::secret::Secret;
use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::tokens_client::TokensClient;
use skep_proto::v1::{
    CancelJobRequest, GetJobRequest, ListJobsRequest, ListNodesRequest, SubmitRequest, job_event,
};
use skep_proto::v1::{
    CreateTokenRequest, ListTokensRequest, RevokeNodeRequest, RevokeTokenRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::exit::Failure;
use crate::progress::Progress;

/// How long past its deadline the CLI waits for the queen's verdict before giving up itself.
const VERDICT_GRACE: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "skep",
    version,
    about = "Run inference jobs on your own machines"
)]
struct Cli {
    /// The queen's URL.
    #[arg(
        long,
        global = true,
        env = "SKEP_QUEEN",
        default_value = "http://127.0.0.1:7700"
    )]
    queen: String,
    /// File (mode 0600) holding your API token.
    #[arg(long, global = true, env = "SKEP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The queen's CA certificate (its <data-dir>/tls/ca.pem), for an https:// queen URL.
    #[arg(long, global = true, env = "SKEP_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submit a job and stream its output.
    Submit {
        /// Model to run.
        #[arg(long)]
        model: String,
        /// Time the job may take, end to end (e.g. 30s, 1m 30s).
        #[arg(long, value_parser = parse_duration)]
        deadline: Duration,
        /// Most tokens to generate (default: the queen's default).
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Sampling temperature, 0 to 2; 0 (the default) decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling cut-off, 0 to 1; 0 or 1 (the default 0) is off.
        #[arg(long, default_value_t = 0.0)]
        top_p: f32,
        /// Seed of the sampler: with --temperature above 0, the same seed gives the same output.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one JSON object per event instead of the text.
        #[arg(long)]
        json: bool,
        /// A progress line on stderr while the job waits (position, predicted start): `auto`
        /// shows it when stderr is a terminal (never with --json).
        #[arg(long, value_enum, default_value = "auto")]
        progress: Progress,
        /// Read the prompt from this file instead of the argument.
        #[arg(long, value_name = "FILE")]
        prompt_file: Option<PathBuf>,
        /// The prompt; `-` reads it from stdin.
        prompt: Option<String>,
    },
    /// Inspect jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Inspect nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Verify, tail and search an audit log (offline, from its files).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// The queen's model catalogue: add a model file, list them.
    Model {
        #[command(subcommand)]
        command: models::ModelCommand,
    },
    /// Which models are warm and where, with each one's cold-load time on each pool.
    Models {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Manage API tokens (admin).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Approver keys for governed actions (offline).
    Approver {
        #[command(subcommand)]
        command: approve::ApproverCommand,
    },
    /// Sign an approval credential for one governed action (offline; see docs/APPROVALS.md).
    Approve(approve::ApproveArgs),
    /// The cluster itself.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Print the queen's cluster id: the environment approvals name (admin).
    Id,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token. It is shown once: keep it in a 0600 file.
    Create {
        /// admin or submit.
        #[arg(long, default_value = "submit", conflicts_with = "enroll")]
        role: String,
        /// Make a single-use enrollment token for a new pool manager (use with --ttl).
        #[arg(long)]
        enroll: bool,
        /// Lifetime (e.g. 30d); default: no expiry.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A name for operators.
        #[arg(long, default_value = "")]
        label: String,
        /// Jobs this token may have queued or running at once (default: the queen's
        /// --max-jobs-per-caller).
        #[arg(long)]
        max_jobs: Option<u32>,
        /// Write the token to this new file (mode 0600) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List tokens (fingerprints only; tokens themselves are never stored).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its fingerprint.
    Revoke {
        fingerprint: String,
        /// An approval credential (`skep approve token.revoke_last_admin`), needed to revoke
        /// the last admin token where the queen requires one.
        #[arg(long)]
        approval: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// Show one job, with its timings per hop.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List recent jobs.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
enum NodesCommand {
    /// List the pool managers known to the queen.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cut a node off at once: its keys stop working and its jobs move elsewhere.
    Revoke { id: String },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: Duration = s
        .parse::<humantime::Duration>()
        .map_err(|e| e.to_string())?
        .into();
    if d.is_zero() {
        return Err("the deadline must be greater than zero".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    // The audit and approval commands work offline on files: no token, no queen.
    let cli = match Cli::parse() {
        Cli {
            command: Command::Audit { command },
            ..
        } => return audit::run(command),
        Cli {
            command: Command::Approver { command },
            ..
        } => return approve::init(command),
        Cli {
            command: Command::Approve(args),
            ..
        } => return approve::approve(args),
        cli => cli,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Failure::other(format!("cannot start runtime: {e}")).report(),
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

/// Authenticated connection to the queen.
struct Queen {
    channel: Channel,
    header: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Queen {
    async fn connect(cli: &Cli) -> Result<Queen, Failure> {
        let path = cli.token_file.as_ref().ok_or_else(|| {
            Failure::usage("no token: pass --token-file FILE or set SKEP_TOKEN_FILE")
        })?;
        let token = Secret::from_file(path).map_err(|e| Failure::usage(e.to_string()))?;
        let header = auth::bearer_header(&token).map_err(|_| {
            Failure::usage(format!("{} does not hold a valid token", path.display()))
        })?;
        let mut endpoint = Channel::from_shared(cli.queen.clone())
            .map_err(|e| Failure::usage(format!("bad --queen URL: {e}")))?;
        if cli.queen.starts_with("https://") {
            let path = cli.ca_file.as_ref().ok_or_else(|| {
                Failure::usage(
                    "an https:// queen needs its CA: pass --ca-file (the queen's \
                     <data-dir>/tls/ca.pem) or set SKEP_CA_FILE",
                )
            })?;
            let ca = std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("--ca-file {}: {e}", path.display())))?;
            endpoint = endpoint
                .tls_config(skep_tls::client_config(&ca, skep_tls::QUEEN_NAME))
                .map_err(|e| Failure::usage(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                Failure::unavailable(format!("cannot reach the queen at {}: {e}", cli.queen))
            })?;
        Ok(Queen { channel, header })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.header.clone());
        req
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let queen = Queen::connect(&cli).await?;
    match cli.command {
        Command::Submit {
            model,
            deadline,
            max_tokens,
            temperature,
            top_p,
            seed,
            json,
            progress,
            prompt_file,
            prompt,
        } => {
            let prompt = prompt::resolve(prompt, prompt_file.as_deref())?;
            let progress = match progress {
                Progress::Always => true,
                Progress::Never => false,
                Progress::Auto => !json && std::io::stderr().is_terminal(),
            };
            submit(
                &queen,
                model,
                deadline,
                Job {
                    max_tokens: max_tokens.unwrap_or(0),
                    sampling: Sampling {
                        temperature,
                        top_p,
                        seed,
                    },
                },
                Output { json, progress },
                prompt,
            )
            .await
        }
        Command::Jobs { command } => {
            let mut client = JobsClient::new(queen.channel.clone());
            match command {
                JobsCommand::Get { id, json } => {
                    let job = client
                        .get(queen.request(GetJobRequest { job_id: id }))
                        .await?
                        .into_inner();
                    render::job(&job, json);
                }
                JobsCommand::List { limit, json } => {
                    let jobs = client
                        .list(queen.request(ListJobsRequest { limit }))
                        .await?
                        .into_inner();
                    for job in &jobs.jobs {
                        render::job(job, json);
                    }
                }
                JobsCommand::Cancel { id } => {
                    client
                        .cancel(queen.request(CancelJobRequest { job_id: id.clone() }))
                        .await?;
                    println!("cancel requested for job {id}");
                }
            }
            Ok(())
        }
        Command::Token { command } => token(&queen, command).await,
        Command::Model { command } => models::run(&queen, command).await,
        Command::Models { json } => models::show(&queen, json).await,
        Command::Audit { .. } | Command::Approver { .. } | Command::Approve(_) => Ok(()),
        Command::Cluster {
            command: ClusterCommand::Id,
        } => {
            let list = TokensClient::new(queen.channel.clone())
                .list(queen.request(ListTokensRequest {}))
                .await?
                .into_inner();
            println!("{}", list.cluster_id);
            Ok(())
        }
        Command::Nodes { command } => {
            let mut client = NodesClient::new(queen.channel.clone());
            match command {
                NodesCommand::List { json } => {
                    let nodes = client
                        .list(queen.request(ListNodesRequest {}))
                        .await?
                        .into_inner();
                    render::nodes(&nodes.nodes, json);
                }
                NodesCommand::Revoke { id } => {
                    client
                        .revoke(queen.request(RevokeNodeRequest {
                            node_id: id.clone(),
                        }))
                        .await?;
                    println!("node {id} revoked");
                }
            }
            Ok(())
        }
    }
}

async fn token(queen: &Queen, command: TokenCommand) -> Result<(), Failure> {
    let mut client = TokensClient::new(queen.channel.clone());
    match command {
        TokenCommand::Create {
            role,
            enroll,
            ttl,
            label,
            max_jobs,
            out,
        } => {
            let role = if enroll { "enroll".to_owned() } else { role };
            let is_enroll = role == "enroll";
            let ttl_ms = ttl.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let created = client
                .create(queen.request(CreateTokenRequest {
                    role,
                    ttl_ms,
                    label,
                    max_jobs: max_jobs.unwrap_or(0),
                }))
                .await?
                .into_inner();
            // An enrollment token carries the queen's CA fingerprint, so the pool that uses it
            // can pin the CA on its first connection.
            let text = if is_enroll && !created.ca_fingerprint.is_empty() {
                format!(
                    "{}{}{}",
                    created.token,
                    skep_tls::PIN_SEPARATOR,
                    created.ca_fingerprint
                )
            } else {
                created.token
            };
            let secret = Secret::from_string(text);
            match out {
                Some(path) => {
                    secret
                        .write_new(&path)
                        .map_err(|e| Failure::other(e.to_string()))?;
                    eprintln!(
                        "token {} written to {}",
                        created.fingerprint,
                        path.display()
                    );
                }
                None => {
                    println!("{}", secret.expose());
                    eprintln!(
                        "token {} created; it will not be shown again",
                        created.fingerprint
                    );
                }
            }
        }
        TokenCommand::List { json } => {
            let list = client
                .list(queen.request(ListTokensRequest {}))
                .await?
                .into_inner();
            render::tokens(&list.tokens, json);
        }
        TokenCommand::Revoke {
            fingerprint,
            approval,
        } => {
            let approval = approve::read_approval(approval.as_deref())?;
            client
                .revoke(queen.request(RevokeTokenRequest {
                    fingerprint: fingerprint.clone(),
                    approval,
                }))
                .await?;
            println!("token {fingerprint} revoked");
        }
    }
    Ok(())
}

/// How `skep submit` shows a job.
#[derive(Clone, Copy)]
/// What the job asks of the worker, beyond its prompt.
struct Job {
    /// 0 = the queen's default.
    max_tokens: u32,
    /// Range-checked by the queen (INVALID_ARGUMENT names the field).
    sampling: Sampling,
}

struct Output {
    /// One JSON object per event on stdout.
    json: bool,
    /// A progress line on stderr while the job waits.
    progress: bool,
}

async fn submit(
    queen: &Queen,
    model: String,
    deadline: Duration,
    Job {
        max_tokens,
        sampling,
    }: Job,
    Output { json, progress }: Output,
    prompt: String,
) -> Result<(), Failure> {
    let started = Instant::now();
    let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
    let mut req = queen.request(SubmitRequest {
        model,
        prompt,
        max_tokens,
        deadline_ms,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        seed: sampling.seed,
    });
    req.set_timeout(deadline);
    let mut client = JobsClient::new(queen.channel.clone());
    let give_up = tokio::time::sleep(deadline + VERDICT_GRACE);
    tokio::pin!(give_up);
    let call = tokio::select! {
        r = client.submit(req) => r,
        _ = &mut give_up => return Err(no_verdict()),
    };
    let mut stream = match call {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if json {
                render::status_json(&status);
            }
            return Err(status.into());
        }
    };
    let mut out = std::io::stdout().lock();
    let mut reported = false;
    let mut job_id = String::new();
    // An accepted job outlives a lost connection (the queen persists it and runs it again after a
    // restart): tell the user where its outcome will be.
    let follow_up = |id: &str| {
        if !id.is_empty() {
            eprintln!(
                "the stream from the queen broke; job {id} was accepted and still runs if it can \
                 finish in time: skep jobs get {id}"
            );
        }
    };
    // While the job waits at the queen: where it is and when it is predicted to start.
    let mut waiting: Option<progress::Waiting> = None;
    let mut tick = tokio::time::interval(progress::TICK);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = &mut give_up => return Err(no_verdict()),
            _ = tick.tick(), if waiting.is_some() => {
                if let Some(w) = &waiting {
                    w.show();
                }
                continue;
            }
        };
        if let Some(w) = waiting.take() {
            w.clear();
        }
        let ev = match msg {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                follow_up(&job_id);
                return Err(Failure::other(
                    "the queen closed the stream without a result",
                ));
            }
            Err(status) => {
                if json && !reported {
                    render::status_json(&status);
                }
                if !reported {
                    follow_up(&job_id);
                }
                return Err(if reported {
                    Failure::quiet(&status)
                } else {
                    status.into()
                });
            }
        };
        if json {
            render::event_json(&ev);
        }
        if job_id.is_empty() {
            job_id.clone_from(&ev.job_id);
        }
        match ev.kind {
            Some(job_event::Kind::Accepted(a)) if !json => {
                eprintln!(
                    "job {} accepted (deadline {}ms, predicted finish {}ms on {})",
                    ev.job_id, a.deadline_ms, a.predicted_finish_ms, a.node_id
                );
            }
            Some(job_event::Kind::Queued(q)) if progress => {
                let w = progress::Waiting::new(
                    q.position,
                    started + Duration::from_millis(q.predicted_start_ms),
                );
                w.show();
                waiting = Some(w);
            }
            Some(job_event::Kind::Token(t)) if !json => {
                let _ = write!(out, "{}", t.text);
                let _ = out.flush();
            }
            Some(job_event::Kind::Restarted(r)) if !json => {
                // What was printed came from a pool that failed; the new one's output differs.
                let _ = writeln!(out);
                let _ = out.flush();
                eprintln!(
                    "[restarted on node {} (attempt {}): {}; the output starts again]",
                    r.node_id, r.attempt, r.reason
                );
            }
            Some(job_event::Kind::Done(d)) => {
                if !json {
                    let _ = writeln!(out);
                    eprintln!(
                        "{}",
                        render::done_line(
                            d.tokens,
                            d.timings.unwrap_or_default(),
                            started.elapsed()
                        )
                    );
                }
                return Ok(());
            }
            Some(job_event::Kind::Error(e)) => {
                reported = true;
                if !json {
                    let _ = writeln!(out);
                    eprintln!("error: {}", e.message);
                }
            }
            _ => {}
        }
    }
}

fn no_verdict() -> Failure {
    Failure::from(Status::new(
        Code::DeadlineExceeded,
        "no answer from the queen before the deadline",
    ))
}
