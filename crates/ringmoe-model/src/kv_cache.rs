//! The KV cache: per layer, the rotated keys and values of every token seen so far, with their
//! absolute positions (a sequence shard's cache holds non-contiguous positions).

/// Keys and values of one layer, `[tokens, n_kv_heads, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub positions: Vec<usize>,
}

impl LayerKv {
    pub fn append(&mut self, k: &[f32], v: &[f32], positions: &[usize]) {
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        self.positions.extend_from_slice(positions);
    }

    /// [`Self::append`] taking the buffers: into an empty cache (a prefill) they move instead of
    /// being copied, so a long prompt's K/V is held once.
    pub fn append_owned(&mut self, k: Vec<f32>, v: Vec<f32>, positions: &[usize]) {
        if self.positions.is_empty() && self.k.is_empty() && self.v.is_empty() {
            self.k = k;
            self.v = v;
            self.positions = positions.to_vec();
        } else {
            self.append(&k, &v, positions);
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// The cache of a whole model for one sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }

    /// Tokens cached (the next token's position in a single-process sequence).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 4)
            .sum()
    }
}
