//! The OpenAI wire format: request bodies (what is accepted, ignored or refused), the rendering
//! of a chat into the single prompt workers take, the deadline headers, and response objects.
//!
//! `temperature` (0..=2, default 0: greedy), `top_p` (0..=1; 0 or 1 is off) and `seed` (default
//! 0) are carried to the worker's sampler, so the same seed reproduces a sampled answer. Workers
//! take one prompt: a chat's turns are rendered into one delimited text that the worker wraps in
//! the model's chat template as one user turn.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use skep_common::sampling::{MAX_TEMPERATURE, Sampling};

use super::HttpError;

/// Which endpoint: `/v1/chat/completions` or `/v1/completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// A validated request, ready for `crate::submit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub model: String,
    pub prompt: String,
    /// 0 = the queen's default.
    pub max_tokens: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    /// Range-checked here (a 400 names the field) and again by `crate::submit`.
    pub sampling: Sampling,
}

/// Longest list of stop strings, as OpenAI allows.
const MAX_STOP: usize = 4;
/// Longest decoder message quoted back to the client.
const MAX_REASON: usize = 200;

#[derive(Deserialize)]
struct Body {
    model: Option<String>,
    messages: Option<Vec<Message>>,
    prompt: Option<PromptField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    n: Option<u32>,
    // Sampling (see the module docs). A negative seed is taken as its 64 bits.
    seed: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    // Accepted, without effect.
    #[allow(dead_code)]
    user: Option<String>,
    // Refused when they ask for something (`unsupported`); absent, null or off is fine.
    tools: Option<Value>,
    functions: Option<Value>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    response_format: Option<Value>,
    echo: Option<bool>,
    suffix: Option<Value>,
    best_of: Option<u32>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// Parses and checks a request body for `kind`. Unknown fields are ignored.
pub fn parse(kind: Kind, body: &[u8]) -> Result<Parsed, HttpError> {
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        // serde quotes the offending value, which may be a whole prompt: keep the gist.
        let mut why = e.to_string();
        if why.len() > MAX_REASON {
            let mut end = MAX_REASON;
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            why.truncate(end);
            why.push('…');
        }
        HttpError::invalid("body", format!("request body is not valid: {why}"))
    })?;
    unsupported(kind, &b)?;
    if let Some(n) = b.n
        && n != 1
    {
        return Err(HttpError::invalid(
            "n",
            format!("n = {n}: skep returns one choice per request (n = 1); send {n} requests"),
        ));
    }
    let model = b
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| HttpError::invalid("model", "`model` is required"))?;
    let prompt = match kind {
        Kind::Chat => {
            let messages = b
                .messages
                .ok_or_else(|| HttpError::invalid("messages", "`messages` is required"))?;
            render(&messages)?
        }
        Kind::Text => match b.prompt {
            Some(PromptField::One(p)) => p,
            Some(PromptField::Many(mut ps)) if ps.len() == 1 => ps.remove(0),
            Some(PromptField::Many(_)) => {
                return Err(HttpError::invalid(
                    "prompt",
                    "one prompt per request: send a string or a list of one",
                ));
            }
            None => return Err(HttpError::invalid("prompt", "`prompt` is required")),
        },
    };
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(HttpError::invalid(
            "stop",
            format!("at most {MAX_STOP} stop strings"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(HttpError::invalid("stop", "a stop string is empty"));
    }
    let stream = b.stream.unwrap_or(false);
    Ok(Parsed {
        model,
        prompt,
        max_tokens: b.max_completion_tokens.or(b.max_tokens).unwrap_or(0),
        stream,
        include_usage: stream
            && b.stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        stop,
        sampling: sampling(b.temperature, b.top_p, b.seed)?,
    })
}

/// `temperature`, `top_p` and `seed`; null is absent. Out of range is a 400 naming the field.
fn sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
) -> Result<Sampling, HttpError> {
    let temperature = temperature.unwrap_or(0.0);
    if !(0.0..=f64::from(MAX_TEMPERATURE)).contains(&temperature) {
        return Err(HttpError::invalid(
            "temperature",
            format!("temperature must be between 0 and {MAX_TEMPERATURE}"),
        ));
    }
    let top_p = top_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(HttpError::invalid("top_p", "top_p must be between 0 and 1"));
    }
    Ok(Sampling {
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed: seed.unwrap_or(0) as u64,
    })
}

/// Refuses fields that ask for what skep does not do yet, naming them.
fn unsupported(kind: Kind, b: &Body) -> Result<(), HttpError> {
    let asked = |v: &Option<Value>| match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    };
    if asked(&b.tools) || asked(&b.functions) {
        let f = if asked(&b.tools) {
            "tools"
        } else {
            "functions"
        };
        return Err(HttpError::unsupported(f, "tool calling is not offered yet"));
    }
    if asked(&b.logprobs) || asked(&b.top_logprobs) {
        let f = if asked(&b.logprobs) {
            "logprobs"
        } else {
            "top_logprobs"
        };
        return Err(HttpError::unsupported(
            f,
            "log probabilities are not reported",
        ));
    }
    if let Some(rf) = &b.response_format
        && !rf.is_null()
        && rf.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(HttpError::unsupported(
            "response_format",
            "structured output is not offered yet; only {\"type\": \"text\"}",
        ));
    }
    if kind == Kind::Text {
        if b.echo == Some(true) {
            return Err(HttpError::unsupported("echo", "the prompt is not echoed"));
        }
        if asked(&b.suffix) {
            return Err(HttpError::unsupported("suffix", "insertion is not offered"));
        }
        if b.best_of.is_some_and(|n| n > 1) {
            return Err(HttpError::unsupported("best_of", "one choice per request"));
        }
    }
    Ok(())
}

/// The single prompt a chat becomes. One user message is the prompt itself; anything else is
/// each turn under a `### System` / `### User` / `### Assistant` heading, blank-line separated,
/// ending with an `### Assistant` heading to answer under. The worker then applies the model's
/// chat template around the whole text as one user turn.
fn render(messages: &[Message]) -> Result<String, HttpError> {
    if messages.is_empty() {
        return Err(HttpError::invalid("messages", "`messages` is empty"));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let heading = match m.role.as_str() {
            "system" | "developer" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(HttpError::unsupported(
                    &format!("messages[{i}].role"),
                    &format!("role {other:?} (tool results need tool calling)"),
                ));
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        _ => {
                            return Err(HttpError::unsupported(
                                &format!("messages[{i}].content[{j}]"),
                                "only text parts are accepted (no images or audio)",
                            ));
                        }
                    }
                }
                t
            }
        };
        turns.push((heading, text));
    }
    if let [("User", text)] = turns.as_slice() {
        return Ok(text.clone());
    }
    let mut out = String::new();
    for (heading, text) in &turns {
        out.push_str(&format!("### {heading}\n{text}\n\n"));
    }
    out.push_str("### Assistant\n");
    Ok(out)
}

/// The request's budget: the smaller of `skep-deadline` (humantime, or bare milliseconds) and
/// `x-stainless-read-timeout` (seconds, as the openai clients send their read timeout); with
/// neither, `default`.
pub fn budget(headers: &HeaderMap, default: Duration) -> Result<Duration, HttpError> {
    let read = |name: &str| -> Result<Option<&str>, HttpError> {
        let mut all = headers.get_all(name).iter();
        let (Some(v), None) = (all.next(), all.next()) else {
            return match headers.get_all(name).iter().count() {
                0 => Ok(None),
                _ => Err(HttpError::invalid(
                    name,
                    format!("more than one `{name}` header"),
                )),
            };
        };
        v.to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| HttpError::invalid(name, format!("`{name}` is not text")))
    };
    let skep = match read("skep-deadline")? {
        None => None,
        Some(s) => Some(parse_deadline(s).ok_or_else(|| {
            HttpError::invalid(
                "skep-deadline",
                format!("`skep-deadline: {s}` is neither a duration (30s, 1m) nor milliseconds"),
            )
        })?),
    };
    let stainless = match read("x-stainless-read-timeout")? {
        None => None,
        Some(s) => Some(
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    HttpError::invalid(
                        "x-stainless-read-timeout",
                        format!("`x-stainless-read-timeout: {s}` is not a number of seconds"),
                    )
                })?,
        ),
    };
    Ok(match (skep, stainless) {
        (Some(a), Some(b)) => a.min(b),
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => default,
    })
}

/// `skep-deadline`: bare digits are milliseconds, anything else humantime.
fn parse_deadline(s: &str) -> Option<Duration> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok().map(Duration::from_millis);
    }
    s.parse::<humantime::Duration>().ok().map(Into::into)
}

/// The `/v1/models` answer.
pub fn model_list(models: BTreeMap<String, u64>) -> Value {
    let data: Vec<Value> = models
        .into_iter()
        .map(|(id, created)| json!({"id": id, "object": "model", "created": created, "owned_by": "skep"}))
        .collect();
    json!({"object": "list", "data": data})
}

/// Token counts for `usage`. `prompt_tokens` is the worker's engine's count of the prompt (the
/// chat template included), reported when the job finishes; 0 when the job did not finish (its
/// output was cut at a stop string, or a deadline).
pub fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens.saturating_add(completion_tokens),
    })
}

/// Identity of one response, shared by its chunks.
pub struct Head {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// One streamed chunk: `text` (the role comes with the first one), or the finish.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    /// The final usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage_chunk(&self, prompt_tokens: u32, completion_tokens: u32) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens),
        })
    }

    /// A whole (non-streaming) response.
    pub fn whole(
        &self,
        text: &str,
        finish: &str,
        prompt_tokens: u32,
        completion_tokens: u32,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish,
            }),
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens),
        })
    }
}

/// Cuts generated text at the first stop string. Text that could still become the start of a
/// stop string is held back until the next token decides, so a stream never shows part of one.
#[derive(Debug, Default)]
pub struct StopCut {
    stops: Vec<String>,
    held: String,
}

impl StopCut {
    pub fn new(stops: Vec<String>) -> StopCut {
        StopCut {
            stops,
            held: String::new(),
        }
    }

    /// Adds a token's text; returns what may be shown now, and whether a stop string was met
    /// (then nothing after it is shown and the generation should end).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_tail(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    /// What is still held when the generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Forgets everything (the output restarts).
    pub fn reset(&mut self) {
        self.held.clear();
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn longest_prefix_tail(text: &str, stop: &str) -> usize {
    let max = (stop.len().saturating_sub(1)).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}
