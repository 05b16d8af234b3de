//! Which experts a process loads: all of them (one process), or those its placement names.

/// Which experts a process loads. The cluster loads only the experts its placement names.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ExpertSelection {
    #[default]
    All,
    /// The same expert ids in every sparse layer.
    Same(Vec<usize>),
    /// Expert ids per layer (index = layer).
    PerLayer(Vec<Vec<usize>>),
}

impl ExpertSelection {
    pub fn includes(&self, layer: usize, expert: usize) -> bool {
        match self {
            Self::All => true,
            Self::Same(ids) => ids.contains(&expert),
            Self::PerLayer(per) => per.get(layer).is_some_and(|ids| ids.contains(&expert)),
        }
    }
}
