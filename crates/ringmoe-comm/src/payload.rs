//! Typed payloads: a shape plus a typed buffer. Buffers move (never copy) through the in-process
//! transport and are written to and read from sockets as their own bytes (`bytemuck`), so the
//! hot path does no per-element conversion.

use ringmoe_core::DType;

/// The elements of a payload. bf16 and f16 travel as their bit patterns.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    BF16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

macro_rules! each_data {
    ($d:expr, $v:ident => $e:expr) => {
        match $d {
            Data::F32($v) => $e,
            Data::BF16($v) => $e,
            Data::F16($v) => $e,
            Data::I32($v) => $e,
            Data::I64($v) => $e,
            Data::U8($v) => $e,
        }
    };
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::BF16(_) => DType::BF16,
            Data::F16(_) => DType::F16,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
            Data::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        each_data!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as little-endian bytes (a view, no copy).
    pub fn as_bytes(&self) -> &[u8] {
        each_data!(self, v => bytemuck::cast_slice(v.as_slice()))
    }

    /// A zeroed buffer of `len` elements of `dtype`, to be filled through [`Self::as_bytes_mut`].
    pub fn zeroed(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; len]),
            DType::BF16 => Data::BF16(vec![half::bf16::ZERO; len]),
            DType::F16 => Data::F16(vec![half::f16::ZERO; len]),
            DType::I32 => Data::I32(vec![0; len]),
            DType::I64 => Data::I64(vec![0; len]),
            DType::U8 => Data::U8(vec![0; len]),
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        each_data!(self, v => bytemuck::cast_slice_mut(v.as_mut_slice()))
    }
}

/// A shaped, typed buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Payload {
    /// Wraps `data` with `shape`; `None` if the element count differs.
    pub fn new(shape: Vec<usize>, data: Data) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    /// A 1-D f32 payload.
    pub fn f32(v: Vec<f32>) -> Self {
        Self {
            shape: vec![v.len()],
            data: Data::F32(v),
        }
    }

    /// An empty payload of `dtype` (zero elements).
    pub fn empty(dtype: DType) -> Self {
        Self {
            shape: vec![0],
            data: Data::zeroed(dtype, 0),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn byte_len(&self) -> usize {
        self.data.as_bytes().len()
    }

    /// The f32 elements, if this is an f32 payload.
    pub fn into_f32(self) -> Option<Vec<f32>> {
        match self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// `"F32[2, 3]"`, for error messages.
    pub fn describe(&self) -> String {
        format!("{:?}{:?}", self.dtype(), self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_views_round_trip_every_dtype() {
        let cases = [
            Data::F32(vec![1.5, -2.0]),
            Data::BF16(vec![half::bf16::from_f32(3.0)]),
            Data::F16(vec![half::f16::from_f32(-0.5), half::f16::from_f32(7.0)]),
            Data::I32(vec![-7, 9]),
            Data::I64(vec![i64::MAX]),
            Data::U8(vec![1, 2, 3]),
        ];
        for d in cases {
            let mut back = Data::zeroed(d.dtype(), d.len());
            back.as_bytes_mut().copy_from_slice(d.as_bytes());
            assert_eq!(back, d);
        }
        assert!(Payload::new(vec![2, 2], Data::U8(vec![0; 3])).is_none());
    }
}
