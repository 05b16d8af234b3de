//! A finished job's output, one type from the workers' events to the store to `GetResult`.

use serde::{Deserialize, Serialize};

use ringmoe_proto::proto::{self, result_chunk};

/// What a job produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// A generate job's new token ids (the lead rank's samples, EOS included if it came).
    Generated { tokens: Vec<u32> },
    /// A score job's negative log-likelihoods: `nll[i]` scores input token `first + i` given
    /// the tokens before it (`first` is 1: the first token has no prefix).
    Scored { first: u64, nll: Vec<f32> },
}

/// Where a job's time went, over its final run (the one that produced the output).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Connecting, placing and loading the experts, preparing and sending the shards.
    pub load_secs: f64,
    /// From `RunJob` until the prefill's last layer (or the first decoded token).
    pub prefill_secs: f64,
    /// Decoding (0 for score jobs).
    pub decode_secs: f64,
    /// Runs it took (1 + retries).
    pub runs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutput {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub timings: Timings,
}

/// A `result.json` as stores hold it: today's [`JobOutput`], or the plain `{"tokens": [...]}` /
/// `{"nll": [...], "mean_nll": x}` objects coordinators wrote before it (so an upgraded
/// coordinator still serves old results).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StoredOutput {
    Current(JobOutput),
    LegacyTokens { tokens: Vec<u32> },
    LegacyScores { nll: Vec<f32> },
}

impl From<StoredOutput> for JobOutput {
    fn from(s: StoredOutput) -> Self {
        let outcome = match s {
            StoredOutput::Current(o) => return o,
            StoredOutput::LegacyTokens { tokens } => Outcome::Generated { tokens },
            StoredOutput::LegacyScores { nll } => Outcome::Scored { first: 1, nll },
        };
        Self {
            outcome,
            timings: Timings::default(),
        }
    }
}

/// Values per `GetResult` chunk (far below any message size limit).
pub const RESULT_CHUNK: usize = 64 * 1024;

impl JobOutput {
    /// The output as `GetResult` streams it.
    pub fn chunks(&self) -> Vec<proto::ResultChunk> {
        match &self.outcome {
            Outcome::Generated { tokens } => tokens
                .chunks(RESULT_CHUNK)
                .map(|c| proto::ResultChunk {
                    part: Some(result_chunk::Part::Tokens(proto::TokenIds {
                        ids: c.to_vec(),
                    })),
                })
                .collect(),
            Outcome::Scored { nll, .. } => nll
                .chunks(RESULT_CHUNK)
                .enumerate()
                .map(|(i, c)| proto::ResultChunk {
                    part: Some(result_chunk::Part::Scores(proto::ScoreChunk {
                        offset: (i * RESULT_CHUNK) as u64,
                        nll: c.to_vec(),
                    })),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_through_json_and_chunk_in_order() {
        let nll: Vec<f32> = (0..RESULT_CHUNK + 5).map(|i| i as f32 * 0.5).collect();
        let out = JobOutput {
            outcome: Outcome::Scored {
                first: 1,
                nll: nll.clone(),
            },
            timings: Timings {
                runs: 2,
                ..Timings::default()
            },
        };
        let back: JobOutput = serde_json::from_slice(&serde_json::to_vec(&out).unwrap()).unwrap();
        assert_eq!(back, out);
        let mut got = Vec::new();
        for c in out.chunks() {
            let Some(result_chunk::Part::Scores(s)) = c.part else {
                panic!("a score job streams scores")
            };
            assert_eq!(s.offset as usize, got.len());
            got.extend(s.nll);
        }
        assert_eq!(got, nll);
    }

    #[test]
    fn results_stored_before_job_output_still_read() {
        let old: StoredOutput =
            serde_json::from_str(r#"{"nll": [1.5, 2.25], "mean_nll": 1.875}"#).unwrap();
        assert_eq!(
            JobOutput::from(old).outcome,
            Outcome::Scored {
                first: 1,
                nll: vec![1.5, 2.25]
            }
        );
        let old: StoredOutput = serde_json::from_str(r#"{"tokens": [5, 6]}"#).unwrap();
        assert_eq!(
            JobOutput::from(old).outcome,
            Outcome::Generated { tokens: vec![5, 6] }
        );
    }
}
