//! The host tensor type: a shape plus f32 storage. Where activations live is a
//! [`crate::Backend`]'s business; this is the CPU's (and every host transfer's) form.

use crate::{Error, Result};

/// A dense, row-major f32 tensor on the host: the CPU backend's activations and every host transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` with `shape`, checking the element count.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Vec<usize>>) -> Result<Self> {
        let shape = shape.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::ElementCount {
                shape,
                expected,
                got: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Self {
        let shape = shape.into();
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn elem_count(&self) -> usize {
        self.data.len()
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// The two dimensions of a matrix, or an error naming `op`.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::InvalidArgument {
                op,
                msg: format!("expected a matrix, got shape {:?}", self.shape),
            }),
        }
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> Result<Self> {
        Self::from_vec(self.data, shape)
    }

    /// Rows `start..end` of a tensor whose first dimension indexes rows.
    pub fn rows(&self, start: usize, end: usize) -> Result<Self> {
        let n = *self.shape.first().unwrap_or(&0);
        if start > end || end > n {
            return Err(Error::InvalidArgument {
                op: "rows",
                msg: format!("rows {start}..{end} out of 0..{n}"),
            });
        }
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Ok(Self {
            shape,
            data: self.data[start * row..end * row].to_vec(),
        })
    }
}
