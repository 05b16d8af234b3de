//! The TCP wire format: a hello per connection, then length-prefixed frames.
//!
//! ```text
//! hello:  magic "RMOE" u32 | version u8 | rank u32 | world u32 | session u64 | token [u8; 32]
//!                                                                                     (53 bytes)
//! frame:  magic u32 | version u8 | dtype u8 | kind u8 | ndim u8 | job u64 | layer u32 | step u32
//!         | dims u64 × ndim | payload bytes u64 | payload
//! ```
//! All integers little-endian. Every field is validated before anything is allocated: a frame from
//! another program, another protocol version, or with a size that disagrees with its shape is an
//! error naming what was wrong.

use ringmoe_core::DType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::payload::Data;
use crate::transport::Message;
use crate::{Kind, Payload, Tag};

pub const MAGIC: u32 = u32::from_le_bytes(*b"RMOE");
/// 2: the hello carries the group's token.
pub const VERSION: u8 = 2;
pub const MAX_DIMS: usize = 8;
pub const HELLO_LEN: usize = 53;

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::I32 => 3,
        DType::I64 => 4,
        DType::U8 => 5,
    }
}

fn dtype_from(code: u8) -> Option<DType> {
    Some(match code {
        0 => DType::F32,
        1 => DType::BF16,
        2 => DType::F16,
        3 => DType::I32,
        4 => DType::I64,
        5 => DType::U8,
        _ => return None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub rank: u32,
    pub world: u32,
    pub session: u64,
    /// The group's secret token (a job's, handed out by the coordinator): a peer that does not
    /// know it is refused before any frame.
    pub token: [u8; 32],
}

impl std::fmt::Debug for Hello {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5..9].copy_from_slice(&self.rank.to_le_bytes());
        b[9..13].copy_from_slice(&self.world.to_le_bytes());
        b[13..21].copy_from_slice(&self.session.to_le_bytes());
        b[21..53].copy_from_slice(&self.token);
        b
    }

    /// Whether `other` holds the same token, compared in time independent of where they differ.
    pub fn same_token(&self, other: &Hello) -> bool {
        self.token
            .iter()
            .zip(&other.token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(format!(
                "bad hello magic {magic:#010x} (expected {MAGIC:#010x}): not a ringmoe peer"
            ));
        }
        if b[4] != VERSION {
            return Err(format!(
                "peer speaks protocol version {}, this rank {VERSION}",
                b[4]
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[13..21]);
        let mut token = [0u8; 32];
        token.copy_from_slice(&b[21..53]);
        Ok(Self {
            rank: u32_at(5),
            world: u32_at(9),
            session: u64::from_le_bytes(s),
            token,
        })
    }
}

/// Encodes a frame header for `msg`.
pub fn encode_header(msg: &Message) -> Vec<u8> {
    let p = &msg.payload;
    let mut h = Vec::with_capacity(24 + 8 * p.shape.len() + 8);
    h.extend_from_slice(&MAGIC.to_le_bytes());
    h.push(VERSION);
    h.push(dtype_code(p.dtype()));
    h.push(msg.tag.kind as u8);
    h.push(p.shape.len() as u8);
    h.extend_from_slice(&msg.tag.job.to_le_bytes());
    h.extend_from_slice(&msg.tag.layer.to_le_bytes());
    h.extend_from_slice(&msg.tag.step.to_le_bytes());
    for &d in &p.shape {
        h.extend_from_slice(&(d as u64).to_le_bytes());
    }
    h.extend_from_slice(&(p.byte_len() as u64).to_le_bytes());
    h
}

/// Why a read stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The connection ended or failed.
    Closed(String),
    /// The bytes are not a valid frame.
    Invalid(String),
}

/// Writes one frame: header, then the payload's own bytes.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    msg: &Message,
) -> std::io::Result<()> {
    w.write_all(&encode_header(msg)).await?;
    w.write_all(msg.payload.data.as_bytes()).await
}

/// Reads and validates one frame; payloads above `max_bytes` are rejected before allocation. The
/// payload buffer comes from `alloc(dtype, elements)`; its contents are fully overwritten.
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    max_bytes: u64,
    alloc: impl FnOnce(DType, usize) -> Data,
) -> Result<Message, ReadError> {
    let closed = |e: std::io::Error| {
        ReadError::Closed(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "connection closed".into()
        } else {
            e.to_string()
        })
    };
    let mut fixed = [0u8; 24];
    r.read_exact(&mut fixed).await.map_err(closed)?;
    let magic = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    if magic != MAGIC {
        return Err(ReadError::Invalid(format!(
            "bad frame magic {magic:#010x} (expected {MAGIC:#010x})"
        )));
    }
    if fixed[4] != VERSION {
        return Err(ReadError::Invalid(format!(
            "frame version {} (expected {VERSION})",
            fixed[4]
        )));
    }
    let dtype = dtype_from(fixed[5])
        .ok_or_else(|| ReadError::Invalid(format!("unknown dtype code {}", fixed[5])))?;
    let kind = Kind::from_u8(fixed[6])
        .ok_or_else(|| ReadError::Invalid(format!("unknown message kind {}", fixed[6])))?;
    let ndim = fixed[7] as usize;
    if ndim > MAX_DIMS {
        return Err(ReadError::Invalid(format!(
            "{ndim} dimensions (at most {MAX_DIMS})"
        )));
    }
    let mut job = [0u8; 8];
    job.copy_from_slice(&fixed[8..16]);
    let layer = u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]);
    let step = u32::from_le_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]);
    let mut rest = vec![0u8; 8 * ndim + 8];
    r.read_exact(&mut rest).await.map_err(closed)?;
    let words: Vec<u64> = rest
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let (dims, len) = (&words[..ndim], words[ndim]);
    let elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let want = elems.and_then(|e| e.checked_mul(dtype.size_in_bytes() as u64));
    if want != Some(len) {
        return Err(ReadError::Invalid(format!(
            "payload of {len} bytes does not match {dtype:?}{dims:?}"
        )));
    }
    if len > max_bytes {
        return Err(ReadError::Invalid(format!(
            "payload of {len} bytes exceeds the {max_bytes}-byte frame limit"
        )));
    }
    let count = (len / dtype.size_in_bytes() as u64) as usize;
    let mut data = alloc(dtype, count);
    r.read_exact(data.as_bytes_mut()).await.map_err(closed)?;
    let shape = dims.iter().map(|&d| d as usize).collect();
    let payload = Payload { shape, data };
    Ok(Message {
        tag: Tag {
            job: u64::from_le_bytes(job),
            layer,
            step,
            kind,
        },
        payload,
    })
}
