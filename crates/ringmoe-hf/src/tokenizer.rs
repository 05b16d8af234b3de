//! `tokenizer.json` through the pure-Rust `tokenizers` crate, plus incremental detokenisation for
//! printing tokens as they are generated.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (BOS).
    /// Only ids are kept, so no character offsets are computed (`encode_fast`: the same ids,
    /// less memory for a long text).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}

/// Turns a stream of generated ids into text pieces whose concatenation is the decode of all the
/// ids, holding output back while the text ends in an incomplete UTF-8 sequence (byte-level BPE
/// splits characters across tokens).
///
/// Each step decodes a short window, not the whole sequence (the offsets scheme of Hugging
/// Face's text-generation-inference): `ids[prefix..read]` is text already emitted, kept as
/// context so that decoders which treat the start of a text specially (a leading space, a byte
/// fallback) decode the new tokens as they would inside the sequence; `ids[read..]` is what is
/// not yet emitted.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.emit(tok, false)
    }

    /// Whatever is still held back, once no more tokens will come (an incomplete character at
    /// the very end then decodes to U+FFFD, as transformers' `decode` shows it).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        self.emit(tok, true)
    }

    fn emit(&mut self, tok: &Tokenizer, last: bool) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        let complete = last || !now.ends_with('\u{FFFD}');
        if !complete || now.len() <= before.len() || !now.is_char_boundary(before.len()) {
            return Ok(None);
        }
        let piece = now[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap()
    }

    /// Streams `ids` and checks the pieces concatenate to the whole decode.
    fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut s = TextStream::default();
        let mut out = String::new();
        for &id in ids {
            if let Some(p) = s.push(tok, id).unwrap() {
                out.push_str(&p);
            }
        }
        if let Some(p) = s.finish(tok).unwrap() {
            out.push_str(&p);
        }
        out
    }

    #[test]
    fn streamed_text_equals_the_whole_decode_across_split_characters() {
        let tok = fixture_tokenizer();
        // Characters the fixture's byte-level BPE never merged arrive one byte per token.
        for text in [
            "héllo wörld ŵŷ 日本語 🎉 end",
            "The quick brown fox",
            "ŵ",
            "a 🎉🎉 b",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(streamed(&tok, &ids), text, "{ids:?}");
        }
    }

    #[test]
    fn random_ids_stream_to_their_decode() {
        let tok = fixture_tokenizer();
        let vocab = tok.vocab_size() as u64;
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for len in [1, 2, 7, 40, 200] {
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab) as u32
                })
                .collect();
            assert_eq!(
                streamed(&tok, &ids),
                tok.decode(&ids, true).unwrap(),
                "{ids:?}"
            );
        }
    }

    #[test]
    fn a_split_character_is_held_back_until_complete() {
        let tok = fixture_tokenizer();
        let ids = tok.encode("🎉", false).unwrap();
        assert!(ids.len() > 1, "the emoji should span tokens: {ids:?}");
        let mut s = TextStream::default();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(s.push(&tok, id).unwrap(), None);
        }
        assert_eq!(
            s.push(&tok, ids[ids.len() - 1]).unwrap().as_deref(),
            Some("🎉")
        );
    }
}
