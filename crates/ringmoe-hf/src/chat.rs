//! Chat templates: the Jinja template a checkpoint ships in `tokenizer_config.json`
//! (`chat_template`, a string or a list of named templates) or in `chat_template.jinja`, rendered
//! the way transformers' `apply_chat_template` renders it — `trim_blocks` and `lstrip_blocks`
//! on, `raise_exception` defined, Python string methods available, the tokenizer's special
//! tokens (`bos_token`, `eos_token`, …) in the context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};

use crate::{Error, Result};

/// One chat message as a template sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A checkpoint's chat template, compiled.
pub struct ChatTemplate {
    env: Environment<'static>,
    path: PathBuf,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` as `tokenizer_config.json` names them.
    special: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// The template of checkpoint `dir`: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template` (with several named ones, `default`).
    /// `None` when the checkpoint has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read(&cfg_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: cfg_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(source) => {
                return Err(Error::Io {
                    path: cfg_path,
                    source,
                });
            }
        };
        let jinja_path = dir.join("chat_template.jinja");
        let (source, path) = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => (s, jinja_path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match template_in_config(&cfg, &cfg_path)? {
                    Some(s) => (s, cfg_path),
                    None => return Ok(None),
                }
            }
            Err(source) => {
                return Err(Error::Io {
                    path: jinja_path,
                    source,
                });
            }
        };
        let special = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .into_iter()
            .filter_map(|k| token_text(&cfg[k]).map(|t| (k, t)))
            .collect();
        Self::new(source, path, special).map(Some)
    }

    /// Compiles `source`; `special` are the special tokens' names and texts.
    pub fn new(
        source: String,
        path: PathBuf,
        special: Vec<(&'static str, String)>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| template_error(&path, &e))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source)
            .map_err(|e| template_error(&path, &e))?;
        Ok(Self { env, path, special })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ending where the assistant's
    /// reply starts. An error carries the template's own message (`raise_exception`: roles
    /// that do not alternate, say), meant for the client.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.path, &e))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        for (k, v) in &self.special {
            ctx.insert(k, Value::from(v.as_str()));
        }
        tmpl.render(Value::from(ctx))
            .map_err(|e| Error::ChatTemplate {
                path: self.path.clone(),
                msg: error_text(&e),
            })
    }
}

/// `chat_template` of a `tokenizer_config.json`: a string, or `[{name, template}]` (the one
/// named `default`).
fn template_in_config(cfg: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    let bad = |msg: &str| Error::ChatTemplate {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    match &cfg["chat_template"] {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(list) => {
            for t in list {
                if t["name"] == "default" {
                    return t["template"]
                        .as_str()
                        .map(|s| Some(s.to_string()))
                        .ok_or_else(|| bad("the template named \"default\" is not a string"));
                }
            }
            Err(bad("chat_template lists no template named \"default\""))
        }
        _ => Err(bad(
            "chat_template is neither a string nor a list of templates",
        )),
    }
}

/// A special token as `tokenizer_config.json` writes it: `"<s>"` or `{"content": "<s>", …}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn error_text(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    }
}

fn template_error(path: &Path, e: &minijinja::Error) -> Error {
    Error::ChatTemplate {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_with_special_tokens_whitespace_control_and_python_methods() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}\n  {{ m.role.upper() }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}".into(),
            "test".into(),
            vec![("bos_token", "<s>".into())],
        )
        .unwrap();
        let out = t.render(&[msg("user", " hi ")], true).unwrap();
        assert_eq!(out, "<s>  USER: hi\nA:");
    }

    #[test]
    fn raise_exception_reaches_the_caller_with_its_message() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok".into(),
            "test".into(),
            vec![],
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "ok");
        let e = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
    }

    #[test]
    fn a_broken_template_is_refused_at_load_naming_the_file() {
        let e = ChatTemplate::new(
            "{% for %}".into(),
            "dir/tokenizer_config.json".into(),
            vec![],
        )
        .unwrap_err();
        assert!(e.to_string().contains("dir/tokenizer_config.json"), "{e}");
    }

    #[test]
    fn named_templates_and_token_objects_are_read() {
        let dir = tempdir();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}D"}],
                "eos_token": {"content": "</s>", "special": true}}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "</s>D");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "</s>"}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_dir(&dir).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The fixtures' templates against transformers' `apply_chat_template` (recorded by
    /// `scripts/make_chat_fixtures.py`): the same prompt text and, tokenized without added
    /// special tokens, the same ids; the same template errors.
    #[test]
    fn fixture_templates_render_as_transformers_does() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let cases: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("chat_cases.json")).unwrap()).unwrap();
        let cases = cases["cases"].as_array().unwrap();
        assert!(cases.len() >= 18);
        for c in cases {
            let dir = root.join(c["model"].as_str().unwrap());
            let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
            let tok = crate::Tokenizer::from_dir(&dir).unwrap();
            let messages: Vec<ChatMessage> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| msg(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            let got = t.render(&messages, c["add_generation_prompt"].as_bool().unwrap());
            match (&c["prompt"], &c["error"]) {
                (serde_json::Value::String(want), _) => {
                    let got = got.unwrap();
                    assert_eq!(&got, want, "{c}");
                    let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
                    assert_eq!(tok.encode(&got, false).unwrap(), ids, "{c}");
                }
                (_, serde_json::Value::String(want)) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(want.as_str()), "{e} vs {want}");
                }
                _ => panic!("a case with neither prompt nor error: {c}"),
            }
        }
        let none = root.join("qwen3-moe-tiny");
        assert!(ChatTemplate::from_dir(&none).unwrap().is_none());
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringmoe-chat-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
