//! Element types that appear in checkpoints and on the wire, and their conversion to f32 compute.

use crate::{Error, Result};

/// An element type. Checkpoints store f32/bf16/f16 weights; token ids are i64; the communicator
/// carries all of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    I64,
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    /// Whether values of this type are floating point weights that compute upcasts to f32.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
}

/// Converts little-endian bytes of a floating point dtype to f32, appending to `out`.
///
/// The bytes come from a memory-mapped checkpoint and may be unaligned, so every element is
/// decoded with `from_le_bytes` rather than by reinterpreting the slice.
pub fn extend_f32_from_le_bytes(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    let size = dtype.size_in_bytes();
    if !bytes.len().is_multiple_of(size) {
        return Err(Error::ByteLength {
            dtype,
            len: bytes.len(),
        });
    }
    out.reserve(bytes.len() / size);
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        ),
        DType::I32 | DType::I64 | DType::U8 => return Err(Error::UnsupportedDType { dtype }),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_and_f16_round_trip_exact_values() {
        let vals = [1.5f32, -2.25, 0.0, 1024.0];
        let mut bf = Vec::new();
        let mut fh = Vec::new();
        for v in vals {
            bf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            fh.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
        }
        let mut out = Vec::new();
        extend_f32_from_le_bytes(DType::BF16, &bf, &mut out).unwrap();
        extend_f32_from_le_bytes(DType::F16, &fh, &mut out).unwrap();
        assert_eq!(out, [vals, vals].concat());
    }

    #[test]
    fn odd_byte_count_is_an_error() {
        let mut out = Vec::new();
        assert!(extend_f32_from_le_bytes(DType::F32, &[0u8; 6], &mut out).is_err());
        assert!(extend_f32_from_le_bytes(DType::I64, &[0u8; 8], &mut out).is_err());
    }
}
