//! Message tags: which job, layer, step and kind of traffic a message belongs to. A receiver
//! always states the tag it expects, so traffic of two jobs or two layers cannot be confused.

use std::fmt;

/// What a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Plain point-to-point data (`send`/`recv`).
    Data = 1,
    /// One ring step (K/V blocks in ring attention).
    Ring = 2,
    /// MoE dispatch (`all_to_all_v` forward).
    Dispatch = 3,
    /// MoE combine (`all_to_all_v` back).
    Combine = 4,
    AllGather = 5,
    AllReduce = 6,
    Barrier = 7,
    /// Generic `all_to_all_v` outside the MoE layer.
    AllToAll = 8,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Self::Data,
        Self::Ring,
        Self::Dispatch,
        Self::Combine,
        Self::AllGather,
        Self::AllReduce,
        Self::Barrier,
        Self::AllToAll,
    ];

    /// Its name in metrics and traces (`op` labels).
    pub fn name(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Ring => "ring",
            Self::Dispatch => "dispatch",
            Self::Combine => "combine",
            Self::AllGather => "all_gather",
            Self::AllReduce => "all_reduce",
            Self::Barrier => "barrier",
            Self::AllToAll => "all_to_all",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Ring,
            3 => Self::Dispatch,
            4 => Self::Combine,
            5 => Self::AllGather,
            6 => Self::AllReduce,
            7 => Self::Barrier,
            8 => Self::AllToAll,
            _ => return None,
        })
    }
}

/// `(job, layer, step, kind)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub job: u64,
    pub layer: u32,
    pub step: u32,
    pub kind: Kind,
}

impl Tag {
    pub fn new(job: u64, layer: u32, step: u32, kind: Kind) -> Self {
        Self {
            job,
            layer,
            step,
            kind,
        }
    }

    /// The same tag with another kind (collectives derive their internal tags this way).
    pub fn with_kind(self, kind: Kind) -> Self {
        Self { kind, ..self }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}(job {}, layer {}, step {})",
            self.kind, self.job, self.layer, self.step
        )
    }
}
