//! The K/V cache of a sequence: per layer, the backend's store of rotated keys and values with
//! their absolute positions ([`LayerKv`] on the host).

pub use ringmoe_core::backend::KvStore;
pub use ringmoe_core::kv::LayerKv;
use ringmoe_core::{Backend, Cpu};

/// The cache of a whole model for one sequence: one backend K/V store per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend = Cpu> {
    pub layers: Vec<B::Kv>,
}

impl KvCache<Cpu> {
    /// An empty host cache of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// The next token's position in a single-process sequence: one past the last position any
    /// layer holds (a sliding-window layer drops old keys, never its newest).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.positions().last())
            .max()
            .map_or(0, |&p| p + 1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(KvStore::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `width` zeros per key at each position.
    fn layer(positions: &[usize], width: usize) -> LayerKv {
        LayerKv {
            k: vec![0.0; positions.len() * width],
            v: vec![0.0; positions.len() * width],
            positions: positions.to_vec(),
        }
    }

    #[test]
    fn the_next_position_survives_trimming() {
        let mut cache = KvCache::new(2);
        let pos: Vec<usize> = (0..50).collect();
        cache.layers[0] = layer(&pos, 2);
        cache.layers[1] = layer(&pos, 2);
        cache.layers[0].trim_to_window(50, 4);
        assert_eq!(cache.layers[0].len(), 3);
        assert_eq!(cache.len(), 50);
    }
}
