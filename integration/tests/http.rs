//! The queen's OpenAI-compatible HTTP door, driven by the real `openai` Python client and by curl
//! against a running cluster (synthetic engine, loopback).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use skep_integration::{Cluster, PoolOpts, audit_text, openai_python, wait_until};
use skep_worker::engine::{Sampling, SyntheticEngine};

/// A queen with the HTTP door on a free loopback port, and one synthetic pool.
#[track_caller]
fn cluster(opts: PoolOpts) -> Cluster {
    Cluster::start_with(&["--http-listen", "127.0.0.1:0"], opts)
}

/// What the synthetic engine answers to `prompt`, token by token.
fn expected(prompt: &str, n: u32) -> Vec<String> {
    (0..n).map(|i| SyntheticEngine::token(prompt, i)).collect()
}

/// What the synthetic engine answers to `prompt` when sampling at a positive temperature with
/// `seed` (the pool's engine has no seed of its own).
fn sampled(prompt: &str, seed: u64, n: u32) -> String {
    let s = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        seed,
    };
    (0..n)
        .map(|i| SyntheticEngine::sampled(prompt, 0, &s, i).1)
        .collect()
}

/// Runs `script` with the pinned openai client; it prints one JSON object.
#[track_caller]
fn python(c: &Cluster, token: &str, script: &str, env: &[(&str, &str)]) -> Value {
    let out = Command::new(openai_python())
        .arg("-c")
        .arg(script)
        .env("BASE", format!("{}/v1", c.http_url()))
        .env("TOKEN", token)
        .envs(env.iter().copied())
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The client with a request counter: every request it sends (retries included) is counted.
const CLIENT: &str = r#"
import json, os, httpx, openai
sent = []
http = httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]})
# The client's defaults, bounded: a 60 s timeout (sent as x-stainless-read-timeout, so also the
# deadline) and two retries, which a refusal that says x-should-retry: false must not use.
c = openai.OpenAI(base_url=os.environ["BASE"], api_key=os.environ["TOKEN"], http_client=http,
    timeout=60, max_retries=2)
def chat(prompt):
    return [{"role": "user", "content": prompt}]
out = {}
"#;

/// One curl call: status, response headers (lower-cased names) and body.
struct Curl {
    status: u16,
    headers: String,
    body: String,
}

impl Curl {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

#[track_caller]
fn curl(dir: &Path, args: &[&str]) -> Curl {
    let (hdr, body) = (dir.join("curl.headers"), dir.join("curl.body"));
    let out: Output = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&hdr)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl is missing: run scripts/install-deps.sh");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Curl {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("status"),
        headers: std::fs::read_to_string(&hdr)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read_to_string(&body).unwrap_or_default(),
    }
}

#[test]
fn openai_client_streams_a_chat_with_usage_stop_strings_and_seeds() {
    let c = cluster(PoolOpts::default());
    let prompt = "Tell me about bees";
    let want = expected(prompt, 8);
    // A stop string that first occurs somewhere after the first token.
    let stop = want[3].clone();
    let full: String = want.concat();
    let cut = full[..full.find(&stop).expect("stop string occurs")].to_owned();
    let script = format!(
        "{CLIENT}{}",
        r#"
prompt, stop = os.environ["PROMPT"], os.environ["STOP"]
chunks = list(c.chat.completions.create(model="synthetic", messages=chat(prompt), stream=True,
    stream_options={"include_usage": True}, max_tokens=8))
out["text"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
out["finish"] = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
out["last_choices"] = len(chunks[-1].choices)
out["last_usage"] = chunks[-1].usage.completion_tokens if chunks[-1].usage else None
counts = lambda u: {k: getattr(u, k) for k in ["prompt_tokens", "completion_tokens", "total_tokens"]}
out["stream_usage"] = counts(chunks[-1].usage) if chunks[-1].usage else None
stopped = list(c.chat.completions.create(model="synthetic", messages=chat(prompt), stream=True,
    max_tokens=8, stop=[stop, "never-said"]))
out["stopped"] = "".join(ch.choices[0].delta.content or "" for ch in stopped if ch.choices)
out["stopped_finish"] = [ch.choices[0].finish_reason for ch in stopped if ch.choices[0].finish_reason]
whole = c.chat.completions.create(model="synthetic", messages=chat(prompt), max_tokens=8, stop=stop)
out["whole_stopped"] = [whole.choices[0].message.content, whole.choices[0].finish_reason]
seeded = lambda seed: c.chat.completions.create(model="synthetic", messages=chat(prompt),
    max_tokens=6, seed=seed, temperature=0.8, top_p=0.9, user="bee-keeper")
same = [seeded(7) for _ in range(2)]
out["seeded"] = [r.choices[0].message.content for r in same]
out["seeded_usage"] = counts(same[0].usage)
out["other_seed"] = seeded(8).choices[0].message.content
greedy = c.chat.completions.create(model="synthetic", messages=chat(prompt), max_tokens=6, seed=7)
out["greedy"] = greedy.choices[0].message.content
raw = c.chat.completions.with_raw_response.create(model="synthetic", messages=chat(prompt), max_tokens=2)
out["headers"] = {k: raw.headers.get(k) for k in ["skep-job-id", "skep-predicted-finish-ms", "skep-node"]}
text = c.completions.create(model="synthetic", prompt=prompt, max_tokens=4)
out["completion"] = [text.choices[0].text, text.choices[0].finish_reason]
out["models"] = [m.id for m in c.models.list().data]
print(json.dumps(out))
"#
    );
    let out = python(
        &c,
        &c.admin_token(),
        &script,
        &[("PROMPT", prompt), ("STOP", &stop)],
    );
    assert_eq!(out["text"], full, "{out}");
    assert_eq!(out["finish"], serde_json::json!(["length"]), "{out}");
    assert_eq!(out["last_choices"], 0, "usage comes last, without choices");
    assert_eq!(out["last_usage"], 8);
    assert_eq!(out["stopped"], cut, "{out}");
    assert_eq!(out["stopped_finish"], serde_json::json!(["stop"]));
    assert_eq!(out["whole_stopped"], serde_json::json!([cut, "stop"]));
    // Sampling is real: the same seed reproduces the text, another seed gives other text, and
    // neither is the greedy answer (which temperature 0 still gives, whatever the seed).
    let seeded = out["seeded"].as_array().unwrap();
    assert_eq!(seeded[0], seeded[1], "{out}");
    assert_eq!(seeded[0], sampled(prompt, 7, 6), "{out}");
    assert_eq!(out["other_seed"], sampled(prompt, 8, 6), "{out}");
    assert_ne!(out["other_seed"], seeded[0], "{out}");
    assert_ne!(seeded[0], want[..6].concat(), "{out}");
    assert_eq!(out["greedy"], want[..6].concat(), "{out}");
    // The synthetic engine counts the prompt's words: "Tell me about bees" is 4 tokens.
    let words = SyntheticEngine::prompt_tokens(prompt);
    assert_eq!(words, 4);
    assert_eq!(
        out["seeded_usage"],
        serde_json::json!({"prompt_tokens": words, "completion_tokens": 6, "total_tokens": words + 6}),
        "{out}"
    );
    assert_eq!(
        out["stream_usage"],
        serde_json::json!({"prompt_tokens": words, "completion_tokens": 8, "total_tokens": words + 8}),
        "{out}"
    );
    let job = out["headers"]["skep-job-id"].as_str().expect("skep-job-id");
    assert_eq!(c.job(job)["state"], "done");
    assert!(
        out["headers"]["skep-predicted-finish-ms"]
            .as_str()
            .is_some()
    );
    assert!(
        !out["headers"]["skep-node"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
    assert_eq!(
        out["completion"],
        serde_json::json!([expected(prompt, 4).concat(), "length"])
    );
    assert_eq!(out["models"], serde_json::json!(["synthetic"]));
}

#[test]
fn an_infeasible_deadline_is_refused_once_and_the_client_does_not_retry() {
    let c = cluster(PoolOpts::default());
    let script = format!(
        "{CLIENT}{}",
        r#"
try:
    c.chat.completions.create(model="synthetic", messages=chat("a long essay"), max_tokens=8000,
        extra_headers={"skep-deadline": "50ms"})
    out["status"] = None
except openai.APIStatusError as e:
    out["status"] = e.status_code
    out["should_retry"] = e.response.headers.get("x-should-retry")
    out["retry_after"] = e.response.headers.get("retry-after")
    out["code"] = e.body.get("code") if isinstance(e.body, dict) else None
    out["message"] = e.message
out["sent"] = len(sent)
print(json.dumps(out))
"#
    );
    let out = python(&c, &c.admin_token(), &script, &[]);
    assert_eq!(out["status"], 503, "{out}");
    assert_eq!(out["code"], "deadline_infeasible", "{out}");
    assert_eq!(out["should_retry"], "false");
    assert!(out["retry_after"].as_str().is_some(), "{out}");
    assert_eq!(out["sent"], 1, "the client sent one request, no retries");
    // The queen saw exactly one: one refusal in its audit.
    let audit = c.dir.join("queen").join("audit");
    let rejected = || audit_text(&audit).matches("\"job.rejected\"").count();
    wait_until("the refusal in the audit", || rejected() >= 1);
    assert_eq!(rejected(), 1);
}

#[test]
fn curl_sees_auth_refusals_models_and_openai_errors() {
    let c = cluster(PoolOpts::default());
    let url = c.http_url();
    let bearer = format!("authorization: Bearer {}", c.admin_token());
    let chat = |extra: &str| {
        format!(r#"{{"model":"synthetic","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
    };
    let post = |auth: &str, body: &str| {
        curl(
            &c.dir,
            &[
                "-H",
                auth,
                "-H",
                "content-type: application/json",
                "--data",
                body,
                &format!("{url}/v1/chat/completions"),
            ],
        )
    };

    let health = curl(&c.dir, &[&format!("{url}/health")]);
    assert_eq!(health.status, 200, "no token needed");
    let metrics = curl(&c.dir, &[&format!("{url}/metrics")]);
    assert_eq!(metrics.status, 200, "Prometheus scrapes without a token");
    assert!(
        metrics
            .headers
            .contains("content-type: application/openmetrics-text"),
        "{}",
        metrics.headers
    );
    assert!(metrics.body.contains("skep:"), "{}", metrics.body);

    let anonymous = curl(&c.dir, &[&format!("{url}/v1/models")]);
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(anonymous.json()["error"]["type"], "authentication_error");
    // Open WebUI lists models with the key it was given.
    let models = curl(&c.dir, &["-H", &bearer, &format!("{url}/v1/models")]);
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["object"], "list");
    assert_eq!(models.json()["data"][0]["id"], "synthetic");
    assert_eq!(models.json()["data"][0]["object"], "model");

    let bad = post("authorization: Bearer not-a-token", &chat(""));
    assert_eq!(bad.status, 401, "{}", bad.body);
    assert_eq!(bad.json()["error"]["code"], "invalid_api_key");

    for (extra, field) in [
        (
            r#","tools":[{"type":"function","function":{"name":"f"}}]"#,
            "tools",
        ),
        (r#","logprobs":true"#, "logprobs"),
        (
            r#","response_format":{"type":"json_object"}"#,
            "response_format",
        ),
        (r#","n":2"#, "n"),
        (r#","temperature":3"#, "temperature"),
        (r#","top_p":1.5"#, "top_p"),
    ] {
        let r = post(&bearer, &chat(extra));
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], field, "{}", r.body);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field)
        );
    }

    // Fields clients commonly send are fine; a streamed answer ends with [DONE].
    let streamed = post(
        &bearer,
        &chat(
            r#","stream":true,"max_tokens":3,"frequency_penalty":0,"presence_penalty":0,"logit_bias":{},"tools":[],"stream_options":{"include_usage":false}"#,
        ),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(streamed.headers.contains("content-type: text/event-stream"));
    assert!(streamed.headers.contains("skep-job-id: "));
    assert!(
        streamed.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        streamed.body
    );
    let text: String = streamed
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).expect("chunk JSON");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, expected("hi", 3).concat());

    let bad_deadline = curl(
        &c.dir,
        &[
            "-H",
            &bearer,
            "-H",
            "skep-deadline: whenever",
            "--data",
            &chat(""),
            &format!("{url}/v1/chat/completions"),
        ],
    );
    assert_eq!(bad_deadline.status, 400, "{}", bad_deadline.body);
    assert_eq!(bad_deadline.json()["error"]["param"], "skep-deadline");

    // The refusals axum makes itself come in OpenAI's shape too.
    let wrong_method = curl(
        &c.dir,
        &["-H", &bearer, &format!("{url}/v1/chat/completions")],
    );
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);
    assert_eq!(wrong_method.json()["error"]["code"], "method_not_allowed");
    let huge = c.dir.join("huge.json");
    std::fs::write(&huge, vec![b' '; 1 << 20]).unwrap();
    let too_large = curl(
        &c.dir,
        &[
            "-H",
            &bearer,
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", huge.display()),
            &format!("{url}/v1/chat/completions"),
        ],
    );
    assert_eq!(too_large.status, 413, "{}", too_large.body);
    assert_eq!(too_large.json()["error"]["code"], "request_too_large");
    assert!(too_large.headers.contains("x-should-retry: false"));
}

#[test]
fn a_client_that_disconnects_cancels_its_job() {
    // Slow tokens, so the job is still running when the client goes.
    let c = cluster(PoolOpts {
        tps: 5.0,
        ..PoolOpts::default()
    });
    let headers = c.dir.join("disconnect.headers");
    let mut client = Command::new("curl")
        .args(["-sSN", "--max-time", "60", "-D"])
        .arg(&headers)
        .args(["-H", &format!("authorization: Bearer {}", c.admin_token())])
        .args(["-H", "skep-deadline: 5m"])
        .args([
            "--data",
            r#"{"model":"synthetic","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"slowly"}]}"#,
        ])
        .arg(format!("{}/v1/chat/completions", c.http_url()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is missing: run scripts/install-deps.sh");
    // Read up to the first token (the chunk after the role).
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut data = 0;
    while data < 2 {
        let line = lines
            .next()
            .expect("stream ended early")
            .expect("read stream");
        if line.starts_with("data: ") {
            data += 1;
        }
    }
    let _ = client.kill();
    let _ = client.wait();
    drop(lines);
    let id = std::fs::read_to_string(&headers)
        .expect("headers")
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("skep-job-id: ")
                .map(|v| v.trim().to_owned())
        })
        .expect("skep-job-id header");
    wait_until("the job to end cancelled", || {
        c.job(&id)["state"] == "cancelled"
    });
}

#[test]
fn a_job_stopped_at_its_deadline_says_so() {
    // `--admission edf` admits without the feasibility check, so a job can run out of time.
    let c = Cluster::start_with(
        &["--http-listen", "127.0.0.1:0", "--admission", "edf"],
        PoolOpts {
            tps: 20.0,
            ..PoolOpts::default()
        },
    );
    let url = format!("{}/v1/chat/completions", c.http_url());
    let bearer = format!("authorization: Bearer {}", c.admin_token());
    let body = |stream: bool| {
        format!(
            r#"{{"model":"synthetic","stream":{stream},"max_tokens":200,"messages":[{{"role":"user","content":"a long story"}}]}}"#
        )
    };
    let args = |stream: bool| {
        vec![
            "-H".to_owned(),
            bearer.clone(),
            "-H".to_owned(),
            "skep-deadline: 700ms".to_owned(),
            "--data".to_owned(),
            body(stream),
            url.clone(),
        ]
    };
    let streamed = curl(
        &c.dir,
        &args(true).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let last: Value = streamed
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .rfind(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .expect("a chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["skep"]["stopped"], "deadline", "{last}");
    assert!(streamed.body.trim_end().ends_with("data: [DONE]"));

    let whole = curl(
        &c.dir,
        &args(false).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(whole.status, 504, "{}", whole.body);
    assert_eq!(whole.json()["error"]["code"], "deadline_exceeded");
    assert!(whole.headers.contains("x-should-retry: false"));
}

#[test]
fn the_door_serves_tls_with_the_queens_certificate() {
    // The queen alone: /health needs no pool.
    let c = Cluster::queen_with("http-tls", &["--tls", "on", "--http-listen", "127.0.0.1:0"]);
    let addr = c.http_url().trim_start_matches("http://").to_owned();
    let port = addr.rsplit_once(':').expect("port").1;
    let ca = c.ca_file();
    for proto in ["--http1.1", "--http2"] {
        let r = curl(
            &c.dir,
            &[
                proto,
                "--cacert",
                ca.to_str().unwrap(),
                "--resolve",
                &format!("queen.skep:{port}:127.0.0.1"),
                &format!("https://queen.skep:{port}/health"),
            ],
        );
        assert_eq!(r.status, 200, "{proto}: {}", r.body);
    }
}
