//! The host K/V cache of one layer: the rotated keys and values of every token seen so far, with
//! their absolute positions (a sequence shard's cache holds non-contiguous positions). The CPU
//! backend's [`crate::Backend::Kv`].

/// Keys and values of one layer, `[tokens, n_kv_heads, head_dim]` each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub positions: Vec<usize>,
}

impl crate::backend::KvStore for LayerKv {
    fn positions(&self) -> &[usize] {
        &self.positions
    }

    fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }
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

    /// Keys held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Drops the keys no query at position `next` or later can see through a sliding window of
    /// `window` keys (a query at `p` sees `p − window + 1 ..= p`), once more than `2 · window`
    /// are held: a windowed layer's cache then stays within `2 · window` keys however long the
    /// sequence (trimming at most every `window` tokens), and keeps the newest one.
    pub fn trim_to_window(&mut self, next: usize, window: usize) {
        let n = self.positions.len();
        if window == 0 || n <= window.saturating_mul(2) {
            return;
        }
        let min = (next + 1).saturating_sub(window);
        let width = self.k.len() / n;
        let mut kept = 0;
        for i in 0..n {
            if self.positions[i] >= min {
                if i != kept {
                    self.k.copy_within(i * width..(i + 1) * width, kept * width);
                    self.v.copy_within(i * width..(i + 1) * width, kept * width);
                    self.positions[kept] = self.positions[i];
                }
                kept += 1;
            }
        }
        if kept == n {
            return;
        }
        self.k.truncate(kept * width);
        self.v.truncate(kept * width);
        self.positions.truncate(kept);
        self.k.shrink_to_fit();
        self.v.shrink_to_fit();
        self.positions.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(positions: &[usize], width: usize) -> LayerKv {
        let mut kv = LayerKv::default();
        for &p in positions {
            let row: Vec<f32> = (0..width).map(|j| (p * 10 + j) as f32).collect();
            let neg: Vec<f32> = row.iter().map(|x| -x).collect();
            kv.append(&row, &neg, &[p]);
        }
        kv
    }

    #[test]
    fn trimming_keeps_the_window_of_the_next_queries_with_their_rows() {
        // A shard's positions: two runs, as zigzag gives them.
        let pos: Vec<usize> = (0..20).chain(80..100).collect();
        let mut kv = layer(&pos, 3);
        kv.trim_to_window(100, 8);
        let want: Vec<usize> = (93..100).collect();
        assert_eq!(kv.positions, want);
        assert_eq!(kv, layer(&want, 3));
        // Short caches are left alone (at most twice the window).
        let mut short = layer(&(0..16).collect::<Vec<_>>(), 2);
        let before = short.clone();
        short.trim_to_window(16, 8);
        assert_eq!(short, before);
        // A shard none of whose keys the next queries see keeps none.
        let mut far = layer(&(0..40).collect::<Vec<_>>(), 2);
        far.trim_to_window(1000, 8);
        assert!(far.is_empty() && far.k.is_empty() && far.v.is_empty());
    }
}
