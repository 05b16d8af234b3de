//! The OpenAI API's request bodies, checked field by field, and the error body every refusal
//! carries. Pure: no I/O, no coordinator state (the HTTP server in `http.rs` uses it).
//!
//! A field this server does not implement is refused with a 400 naming it, unless it is one
//! clients send at its neutral value (`frequency_penalty: 0`, `logit_bias: {}`, `user`, …): a
//! request is never half-honoured silently.

use serde_json::{Map, Value, json};

/// An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about one field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad(message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            ..Self::bad(message)
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Sampling and stopping, common to both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    /// `None`: a fresh random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `ringmoe_attention`: `dense` (default), `a-shape` or `vertical-slash` (prefill only).
    pub attention: String,
    /// `ringmoe_priority`: the job's queue priority (higher first).
    pub priority: i32,
}

/// What a completion prompt is given as.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub echo: bool,
    /// `logprobs: 0`: each token's log-probability (top alternatives are not computed).
    pub logprobs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ringmoe_hf::ChatMessage>,
    pub sampling: Sampling,
}

/// Parses a request body: valid UTF-8, a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad(format!(
            "the request body must be a JSON object, got {}",
            kind_of(&other)
        ))),
        Err(e) => Err(ApiError::bad(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

pub fn completion(body: Map<String, Value>) -> Result<CompletionRequest, ApiError> {
    let mut f = Fields(body);
    let model = f.model()?;
    let prompt = match f.take("prompt") {
        None => return Err(ApiError::field("prompt", "prompt is required")),
        Some(Value::String(s)) => Prompt::Text(s),
        Some(Value::Array(a)) => prompt_array(a)?,
        Some(v) => {
            return Err(ApiError::field(
                "prompt",
                format!(
                    "prompt must be a string or an array of token ids, got {}",
                    kind_of(&v)
                ),
            ));
        }
    };
    let echo = f.bool("echo")?.unwrap_or(false);
    let logprobs = match f.take("logprobs") {
        None => false,
        Some(Value::Number(n)) if n.as_u64() == Some(0) => true,
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            return Err(ApiError::field(
                "logprobs",
                format!(
                    "logprobs: {n} asks for the top {n} alternatives at each position, which this \
                     server does not compute; logprobs: 0 returns each token's log-probability"
                ),
            ));
        }
        Some(v) => {
            return Err(ApiError::field(
                "logprobs",
                format!("logprobs must be an integer (0), got {}", kind_of(&v)),
            ));
        }
    };
    f.neutral(
        "best_of",
        |v| v.as_u64() == Some(1),
        "only best_of: 1 is supported",
    )?;
    f.neutral("suffix", |_| false, "suffix (insertion) is not supported")?;
    let sampling = f.sampling("max_tokens", 16)?;
    if logprobs && !sampling.stop.is_empty() {
        return Err(ApiError::field(
            "stop",
            "stop and logprobs together are not supported",
        ));
    }
    f.finish()?;
    Ok(CompletionRequest {
        model,
        prompt,
        sampling,
        echo,
        logprobs,
    })
}

pub fn chat(body: Map<String, Value>) -> Result<ChatRequest, ApiError> {
    let mut f = Fields(body);
    let model = f.model()?;
    let messages = match f.take("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a
            .into_iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => {
            return Err(ApiError::field("messages", "messages must not be empty"));
        }
        None => return Err(ApiError::field("messages", "messages is required")),
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("messages must be an array, got {}", kind_of(&v)),
            ));
        }
    };
    f.neutral(
        "logprobs",
        |v| v == &Value::Bool(false),
        "logprobs is supported on /v1/completions only",
    )?;
    f.neutral("top_logprobs", |_| false, "top_logprobs is not supported")?;
    // The newer name wins when both are given (as OpenAI documents).
    let sampling = match f.u32("max_completion_tokens")? {
        Some(n) => {
            f.take("max_tokens");
            let mut s = f.sampling("max_tokens", 0)?;
            s.max_tokens = Some(n);
            s
        }
        None => f.sampling("max_tokens", 0)?,
    };
    f.finish()?;
    Ok(ChatRequest {
        model,
        messages,
        sampling,
    })
}

fn prompt_array(a: Vec<Value>) -> Result<Prompt, ApiError> {
    let many = || {
        ApiError::field(
            "prompt",
            "a batch of prompts is not supported: send one prompt per request",
        )
    };
    match a.as_slice() {
        [Value::String(s)] => Ok(Prompt::Text(s.clone())),
        [Value::Array(inner)] => token_ids(inner),
        [Value::String(_) | Value::Array(_), _, ..] => Err(many()),
        [] => Err(ApiError::field("prompt", "prompt must not be empty")),
        _ => token_ids(&a),
    }
}

fn token_ids(a: &[Value]) -> Result<Prompt, ApiError> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::field(
                        "prompt",
                        format!("prompt[{i}] must be a token id (a non-negative integer), got {v}"),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()
        .map(Prompt::Tokens)
}

fn message(i: usize, m: Value) -> Result<ringmoe_hf::ChatMessage, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(mut m) = m else {
        return Err(ApiError::field(
            &param,
            format!("{param} must be an object with role and content"),
        ));
    };
    let role = match m.remove("role") {
        Some(Value::String(r)) => r,
        _ => {
            return Err(ApiError::field(
                &param,
                format!("{param}.role must be a string"),
            ));
        }
    };
    let content = match m.remove("content") {
        Some(Value::String(c)) => c,
        Some(Value::Null) | None => String::new(),
        // Content parts: text only.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::field(
                            &param,
                            format!(
                                "{param}.content[{j}] must be a text part ({{\"type\": \"text\", \"text\": …}}); \
                                 this server takes text only"
                            ),
                        ));
                    }
                }
            }
            text
        }
        Some(v) => {
            return Err(ApiError::field(
                &param,
                format!("{param}.content must be a string, got {}", kind_of(&v)),
            ));
        }
    };
    m.remove("name");
    if let Some(k) = m.keys().next() {
        return Err(ApiError::field(
            &param,
            format!("{param}.{k} is not supported (tool calls are not implemented)"),
        ));
    }
    Ok(ringmoe_hf::ChatMessage { role, content })
}

/// A request's fields, taken one by one; what is left at the end is refused.
struct Fields(Map<String, Value>);

impl Fields {
    /// The field's value; `null` is the same as absent.
    fn take(&mut self, k: &str) -> Option<Value> {
        self.0.remove(k).filter(|v| !v.is_null())
    }

    fn model(&mut self) -> Result<String, ApiError> {
        match self.take("model") {
            Some(Value::String(m)) if !m.is_empty() => Ok(m),
            Some(v) if !v.is_string() => Err(ApiError::field(
                "model",
                format!("model must be a string, got {}", kind_of(&v)),
            )),
            _ => Err(ApiError::field("model", "model is required")),
        }
    }

    fn bool(&mut self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(ApiError::field(
                k,
                format!("{k} must be a boolean, got {}", kind_of(&v)),
            )),
        }
    }

    fn number(&mut self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(ApiError::field(
                k,
                format!("{k} must be a number, got {}", kind_of(&v)),
            )),
        }
    }

    fn u32(&mut self, k: &str) -> Result<Option<u32>, ApiError> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::field(k, format!("{k} must be a non-negative integer, got {n}"))
                }),
            Some(v) => Err(ApiError::field(
                k,
                format!("{k} must be an integer, got {}", kind_of(&v)),
            )),
        }
    }

    /// A field accepted only at a value that changes nothing.
    fn neutral(&mut self, k: &str, ok: impl Fn(&Value) -> bool, why: &str) -> Result<(), ApiError> {
        match self.take(k) {
            Some(v) if !ok(&v) => Err(ApiError::field(k, format!("{k}: {why}"))),
            _ => Ok(()),
        }
    }

    fn sampling(&mut self, max_key: &str, default_max: u32) -> Result<Sampling, ApiError> {
        let max_tokens = match self.u32(max_key)? {
            Some(n) => Some(n),
            None if default_max > 0 => Some(default_max),
            None => None,
        };
        let temperature = self.number("temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::field(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.number("top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::field(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let seed = match self.take("seed") {
            None => None,
            // Negative seeds are valid in OpenAI's API: their bits are the seed.
            Some(Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
                Some(n.as_u64().unwrap_or_else(|| n.as_i64().unwrap_or(0) as u64))
            }
            Some(v) => {
                return Err(ApiError::field(
                    "seed",
                    format!("seed must be an integer, got {v}"),
                ));
            }
        };
        let stop = match self.take("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    v => Err(ApiError::field(
                        "stop",
                        format!("stop must be strings, got {}", kind_of(&v)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "stop must be a string or an array of strings, got {}",
                        kind_of(&v)
                    ),
                ));
            }
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::field(
                "stop",
                "stop takes up to 4 non-empty strings",
            ));
        }
        match self.u32("n") {
            Ok(None | Some(1)) => {}
            Ok(Some(n)) => {
                return Err(ApiError::field(
                    "n",
                    format!(
                        "only n: 1 is supported, got {n}; send {n} requests with different seeds"
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
        let stream = self.bool("stream")?.unwrap_or(false);
        let include_usage = match self.take("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::field(
                        "stream_options",
                        format!("stream_options.include_usage must be a boolean, got {v}"),
                    ));
                }
            },
            Some(v) => {
                return Err(ApiError::field(
                    "stream_options",
                    format!("stream_options must be an object, got {}", kind_of(&v)),
                ));
            }
        };
        let zero = |v: &Value| v.as_f64() == Some(0.0);
        self.neutral("frequency_penalty", zero, "only 0 is supported")?;
        self.neutral("presence_penalty", zero, "only 0 is supported")?;
        self.neutral(
            "logit_bias",
            |v| v.as_object().is_some_and(Map::is_empty),
            "logit_bias is not supported",
        )?;
        self.neutral("user", Value::is_string, "user must be a string")?;
        let attention = match self.take("ringmoe_attention") {
            None => "dense".to_string(),
            Some(Value::String(a))
                if ["dense", "a-shape", "vertical-slash"].contains(&a.as_str()) =>
            {
                a
            }
            Some(v) => {
                return Err(ApiError::field(
                    "ringmoe_attention",
                    format!(
                        "ringmoe_attention must be \"dense\", \"a-shape\" or \"vertical-slash\", got {v}"
                    ),
                ));
            }
        };
        let priority = match self.take("ringmoe_priority") {
            None => 0,
            Some(Value::Number(n)) if n.as_i64().and_then(|p| i32::try_from(p).ok()).is_some() => {
                n.as_i64().unwrap_or(0) as i32
            }
            Some(v) => {
                return Err(ApiError::field(
                    "ringmoe_priority",
                    format!("ringmoe_priority must be a 32-bit integer, got {v}"),
                ));
            }
        };
        Ok(Sampling {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
            stop,
            stream,
            include_usage,
            attention,
            priority,
        })
    }

    fn finish(self) -> Result<(), ApiError> {
        let mut left: Vec<&String> = self.0.keys().collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(k) => Err(ApiError::field(
                k,
                format!(
                    "unsupported field{}: {}",
                    if left.len() > 1 { "s" } else { "" },
                    left.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where the completion's text stops: the first stop string (the text before it is the
/// answer), or how much can be sent now — everything but a tail that might still become a stop
/// string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopScan {
    Stopped { at: usize },
    Safe { upto: usize },
}

/// Scans `text` for `stops`; `from` is where earlier scans left off (bytes already sent).
pub fn scan_stops(text: &str, from: usize, stops: &[String]) -> StopScan {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut start = from.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    if let Some(at) = stops
        .iter()
        .filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i))
        .min()
    {
        return StopScan::Stopped { at };
    }
    // Hold back the longest suffix that is a proper prefix of a stop string.
    let mut upto = text.len();
    for s in stops {
        for k in (1..s.len()).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                upto = upto.min(text.len() - k);
                break;
            }
        }
    }
    StopScan::Safe {
        upto: upto.max(from.min(text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Map<String, Value> {
        object(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_completion_request_parses_with_defaults() {
        let r = completion(parse(r#"{"model": "m", "prompt": "hi"}"#)).unwrap();
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
        assert_eq!(r.sampling.max_tokens, Some(16));
        assert_eq!(r.sampling.temperature, 1.0);
        assert!(!r.sampling.stream && !r.echo && !r.logprobs);
        let r = completion(parse(
            r#"{"model": "m", "prompt": [[1, 2]], "max_tokens": 0, "echo": true, "logprobs": 0,
                "seed": -1, "n": 1, "frequency_penalty": 0, "logit_bias": {}, "user": "u",
                "stream": true, "stream_options": {"include_usage": true}, "ringmoe_attention": "vertical-slash"}"#,
        ))
        .unwrap();
        assert_eq!(r.prompt, Prompt::Tokens(vec![1, 2]));
        assert_eq!(r.sampling.max_tokens, Some(0));
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        assert!(r.echo && r.logprobs && r.sampling.include_usage);
        assert_eq!(r.sampling.attention, "vertical-slash");
    }

    #[test]
    fn bad_fields_are_refused_naming_the_field() {
        for (body, param) in [
            (r#"{"prompt": "x"}"#, "model"),
            (r#"{"model": 3, "prompt": "x"}"#, "model"),
            (r#"{"model": "m"}"#, "prompt"),
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": -1}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "prompt": "x", "max_tokens": "5"}"#,
                "max_tokens",
            ),
            (r#"{"model": "m", "prompt": "x", "n": 2}"#, "n"),
            (
                r#"{"model": "m", "prompt": "x", "temperature": 3}"#,
                "temperature",
            ),
            (r#"{"model": "m", "prompt": "x", "top_p": 0}"#, "top_p"),
            (
                r#"{"model": "m", "prompt": "x", "logprobs": 5}"#,
                "logprobs",
            ),
            (r#"{"model": "m", "prompt": ["a", "b"]}"#, "prompt"),
            (r#"{"model": "m", "prompt": [1, -2]}"#, "prompt"),
            (
                r#"{"model": "m", "prompt": "x", "stop": ["", "a"]}"#,
                "stop",
            ),
            (
                r#"{"model": "m", "prompt": "x", "presence_penalty": 0.5}"#,
                "presence_penalty",
            ),
            (r#"{"model": "m", "prompt": "x", "tools": []}"#, "tools"),
            (
                r#"{"model": "m", "prompt": "x", "ringmoe_attention": "sparse"}"#,
                "ringmoe_attention",
            ),
        ] {
            let e = completion(parse(body)).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(
                e.message.contains(param) || param == "model",
                "{body}: {e:?}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused() {
        for (body, what) in [
            (&b"{\"model\": \"m\", "[..], "not valid JSON"),
            (&b"[1, 2]"[..], "JSON object"),
            (&b"{\"model\": \"\xff\"}"[..], "UTF-8"),
        ] {
            let e = object(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(what), "{e:?}");
        }
    }

    #[test]
    fn chat_messages_parse_with_text_parts_and_refuse_others() {
        let r = chat(parse(
            r#"{"model": "m", "messages": [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "max_completion_tokens": 7, "max_tokens": 3}"#,
        ))
        .unwrap();
        assert_eq!(r.messages[1].content, "ab");
        assert_eq!(r.sampling.max_tokens, Some(7));
        for body in [
            r#"{"model": "m", "messages": []}"#,
            r#"{"model": "m", "messages": [{"content": "x"}]}"#,
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
            r#"{"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}"#,
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true}"#,
        ] {
            assert_eq!(chat(parse(body)).unwrap_err().status, 400, "{body}");
        }
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_a_possible_start() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(scan_stops("abc", 0, &stops), StopScan::Safe { upto: 3 });
        assert_eq!(scan_stops("abcE", 0, &stops), StopScan::Safe { upto: 3 });
        assert_eq!(scan_stops("abcEN", 3, &stops), StopScan::Safe { upto: 3 });
        assert_eq!(
            scan_stops("abcENDx", 3, &stops),
            StopScan::Stopped { at: 3 }
        );
        assert_eq!(scan_stops("a\n\nb", 1, &stops), StopScan::Stopped { at: 1 });
        assert_eq!(scan_stops("héllo\n", 0, &stops), StopScan::Safe { upto: 6 });
        assert_eq!(scan_stops("x", 0, &[]), StopScan::Safe { upto: 1 });
    }
}
