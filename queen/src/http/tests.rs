//! Unit tests of the HTTP door's wire format: parsing, refusals, chat rendering, deadline
//! headers and stop strings.

use std::time::Duration;

use axum::http::HeaderMap;

use skep_common::sampling::Sampling;

use super::openai::{self, Kind, StopCut};

#[track_caller]
fn parse(kind: Kind, body: &str) -> Result<openai::Parsed, super::HttpError> {
    openai::parse(kind, body.as_bytes())
}

#[test]
fn one_user_message_is_the_prompt() {
    let p = parse(
        Kind::Chat,
        r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"stream":true,
            "stream_options":{"include_usage":true},"max_completion_tokens":7,"max_tokens":3,
            "stop":"\n","seed":1,"temperature":0.7,"top_p":0.9,"n":1,"user":"u",
            "frequency_penalty":0,"tools":[],"logprobs":false,"response_format":{"type":"text"}}"#,
    )
    .unwrap();
    assert_eq!(p.prompt, "hello");
    assert_eq!(p.max_tokens, 7, "max_completion_tokens wins");
    assert!(p.stream && p.include_usage);
    assert_eq!(p.stop, vec!["\n".to_owned()]);
    assert_eq!(
        p.sampling,
        Sampling {
            temperature: 0.7,
            top_p: 0.9,
            seed: 1
        }
    );
}

#[test]
fn sampling_defaults_to_greedy_and_is_range_checked() {
    let chat = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
    let p = parse(Kind::Chat, &format!("{{{chat}}}")).unwrap();
    assert_eq!(p.sampling, Sampling::default());
    let p = parse(
        Kind::Chat,
        &format!(r#"{{{chat},"temperature":null,"top_p":null,"seed":null}}"#),
    )
    .unwrap();
    assert_eq!(p.sampling, Sampling::default());
    let p = parse(
        Kind::Chat,
        &format!(r#"{{{chat},"temperature":2,"seed":-1}}"#),
    )
    .unwrap();
    assert_eq!((p.sampling.temperature, p.sampling.seed), (2.0, u64::MAX));
    for (field, body) in [
        ("temperature", r#""temperature":3"#),
        ("temperature", r#""temperature":-0.5"#),
        ("top_p", r#""top_p":1.5"#),
        ("top_p", r#""top_p":-1"#),
    ] {
        let e = parse(Kind::Chat, &format!("{{{chat},{body}}}")).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert_eq!(e.param.as_deref(), Some(field), "{body}");
        assert!(e.message.contains(field), "{body}: {}", e.message);
    }
}

#[test]
fn a_chat_is_rendered_into_delimited_turns() {
    let p = parse(
        Kind::Chat,
        r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"}]},
            {"role":"assistant","content":"hello"},{"role":"user","content":"again"}]}"#,
    )
    .unwrap();
    assert_eq!(
        p.prompt,
        "### System\nbe brief\n\n### User\nhi\n\n### Assistant\nhello\n\n### User\nagain\n\n### Assistant\n"
    );
    assert_eq!(p.max_tokens, 0);
    assert!(!p.stream);
}

#[test]
fn refusals_name_the_field() {
    let check = |kind, body: &str, param: &str, status: u16| {
        let e = parse(kind, body).unwrap_err();
        assert_eq!(e.status.as_u16(), status, "{body}: {}", e.message);
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        assert!(e.body()["error"]["message"].is_string());
    };
    let chat = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
    check(Kind::Chat, &format!(r#"{{{chat},"n":2}}"#), "n", 400);
    check(
        Kind::Chat,
        &format!(r#"{{{chat},"tools":[{{"type":"function"}}]}}"#),
        "tools",
        400,
    );
    check(
        Kind::Chat,
        &format!(r#"{{{chat},"logprobs":true}}"#),
        "logprobs",
        400,
    );
    check(
        Kind::Chat,
        &format!(r#"{{{chat},"response_format":{{"type":"json_object"}}}}"#),
        "response_format",
        400,
    );
    check(
        Kind::Chat,
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
        "model",
        400,
    );
    check(
        Kind::Chat,
        r#"{"model":"m","messages":[]}"#,
        "messages",
        400,
    );
    check(
        Kind::Chat,
        r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
        "messages[0].role",
        400,
    );
    check(
        Kind::Chat,
        &format!(r#"{{{chat},"stop":["a","b","c","d","e"]}}"#),
        "stop",
        400,
    );
    check(
        Kind::Text,
        r#"{"model":"m","prompt":["a","b"]}"#,
        "prompt",
        400,
    );
    check(
        Kind::Text,
        r#"{"model":"m","prompt":"a","echo":true}"#,
        "echo",
        400,
    );
    check(Kind::Chat, "not json", "body", 400);
}

#[test]
fn text_prompts() {
    let p = parse(
        Kind::Text,
        r#"{"model":"m","prompt":["only"],"max_tokens":4}"#,
    )
    .unwrap();
    assert_eq!((p.prompt.as_str(), p.max_tokens), ("only", 4));
}

#[test]
fn the_budget_is_the_smallest_header_or_the_default() {
    let h = |pairs: &[(&'static str, &str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    };
    let d = Duration::from_secs(60);
    let b = |pairs: &[(&'static str, &str)]| openai::budget(&h(pairs), d);
    assert_eq!(b(&[]).unwrap(), d);
    assert_eq!(
        b(&[("skep-deadline", "1500")]).unwrap(),
        Duration::from_millis(1500)
    );
    assert_eq!(
        b(&[("skep-deadline", "2s")]).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(
        b(&[("x-stainless-read-timeout", "600.0")]).unwrap(),
        Duration::from_secs(600)
    );
    assert_eq!(
        b(&[("skep-deadline", "30s"), ("x-stainless-read-timeout", "5")]).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(
        b(&[("skep-deadline", "soon")])
            .unwrap_err()
            .param
            .as_deref(),
        Some("skep-deadline")
    );
    assert!(b(&[("x-stainless-read-timeout", "-1")]).is_err());
    assert!(b(&[("skep-deadline", "1s"), ("skep-deadline", "2s")]).is_err());
}

#[test]
fn stop_strings_cut_and_never_show_part_of_one() {
    let mut c = StopCut::new(vec!["END".into(), "\n\n".into()]);
    assert_eq!(c.push("hello E"), ("hello ".to_owned(), false));
    assert_eq!(c.push("N"), (String::new(), false));
    assert_eq!(c.push("D more"), (String::new(), true));
    let mut c = StopCut::new(vec!["END".into()]);
    assert_eq!(c.push("a E"), ("a ".to_owned(), false));
    assert_eq!(c.push("x"), ("Ex".to_owned(), false));
    assert_eq!(c.push(" E"), (" ".to_owned(), false));
    assert_eq!(c.finish(), "E");
    let mut c = StopCut::new(vec!["é!".into()]);
    assert_eq!(c.push("caf"), ("caf".to_owned(), false));
    assert_eq!(c.push("é"), (String::new(), false));
    assert_eq!(c.push("!x"), (String::new(), true));
    let mut none = StopCut::new(Vec::new());
    assert_eq!(none.push("abc"), ("abc".to_owned(), false));
}
