//! Memory-mapped safetensors checkpoints, single-file or sharded (`model.safetensors.index.json`).
//!
//! Opening a checkpoint maps the files and parses only their JSON headers. A tensor's bytes are
//! touched only when that tensor is loaded, so a worker that loads a quarter of the experts pages
//! in about a quarter of the expert bytes. [`Checkpoint::bytes_read`] counts the tensor bytes
//! actually decoded, which the tests use to show that a subset load reads nothing else.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use ringmoe_core::{DType, Tensor, WeightPrecision, Weights};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::read_json;
use crate::{Error, Result};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + JSON header).
    data_start: usize,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

/// Anything the model loader can take named, shaped f32 tensors from: a checkpoint on disk, or
/// [`RandomWeights`] for benchmarks and tests that need a model of a given shape but no file.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// The tensor `name` as f32, which must have exactly `shape`.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The `[rows, cols]` matrix `name` held as `precision` says. Sources that only have f32
    /// (random weights) convert from it; a checkpoint keeps bf16/f16 bits without an f32 copy.
    fn load_weights(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        precision: WeightPrecision,
    ) -> Result<Weights> {
        let t = self.load(name, &[rows, cols])?;
        Ok(Weights::from_f32_as(
            t.into_vec(),
            rows,
            cols,
            precision.format_for(DType::F32),
        )?)
    }
}

impl TensorSource for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Checkpoint::load(self, name, shape)
    }

    fn load_weights(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        precision: WeightPrecision,
    ) -> Result<Weights> {
        let meta = self.checked_float(name, &[rows, cols])?;
        let format = precision.format_for(meta.dtype);
        let (meta, bytes) = self.raw(name)?;
        Ok(Weights::from_le_bytes(
            meta.dtype, bytes, rows, cols, format,
        )?)
    }
}

/// Seeded random weights of whatever shape is asked for: norms near 1, matrices with
/// `1/sqrt(fan_in)` scale (so activations stay O(1) through deep stacks), deterministic per
/// (seed, tensor name).
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights {
    pub seed: u64,
}

impl TensorSource for RandomWeights {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let seed = name
            .bytes()
            .fold(self.seed ^ 0xCBF2_9CE4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
            });
        let n: usize = shape.iter().product();
        let (center, amp) = if name.contains("norm") {
            (1.0, 0.1)
        } else if name.contains("embed_tokens") {
            (0.0, 1.0)
        } else {
            (0.0, (3.0 / *shape.last().unwrap_or(&1) as f32).sqrt())
        };
        let mut rng = ringmoe_core::testing::XorShift::new(seed);
        let data = (0..n)
            .map(|_| center + rng.next_signed_unit() * amp)
            .collect();
        Ok(Tensor::from_vec(data, shape.to_vec())?)
    }
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorMeta>,
    bytes_read: AtomicU64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn convert_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors.index.json` if present, else `DIR/model.safetensors` (the
    /// hub's single-file name), else every `DIR/*.safetensors` file. Other safetensors files
    /// beside an index or a `model.safetensors` (reference outputs, say) are not weights.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::Safetensors {
                    path: index.clone(),
                    msg: "no \"weight_map\" object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Safetensors {
                    path: index.clone(),
                    msg: format!("weight_map entry for {tensor:?} is not a file name"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::Safetensors {
                        path: index.clone(),
                        msg: format!("shard name {file:?} leaves the directory"),
                    });
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            files
        } else if dir.join("model.safetensors").is_file() {
            vec!["model.safetensors".to_string()]
        } else {
            let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let mut files: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Safetensors {
                    path: dir.to_path_buf(),
                    msg: "no *.safetensors files in the model directory".into(),
                });
            }
            files
        };
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        Self::open_files(dir, &paths)
    }

    /// Opens an explicit list of safetensors files (also used for `--input-ids` files).
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only and private to this process. A checkpoint file that
            // another process truncates while we run would fault on access; that is the documented
            // trade-off of memory-mapping weights (candle and safetensors do the same).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = convert_dtype(info.dtype).ok_or_else(|| Error::TensorDType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.dtype),
                })?;
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() || s > e {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor {name:?} lies outside the file"),
                    });
                }
                tensors.insert(
                    name,
                    TensorMeta {
                        dtype,
                        shape: info.shape.clone(),
                        file: fi,
                        start: s,
                        end: e,
                    },
                );
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
            bytes_read: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn meta(&self, name: &str) -> Result<&TensorMeta> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// Names of every tensor in the checkpoint.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Total bytes of tensor data in the checkpoint.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|m| (m.end - m.start) as u64)
            .sum()
    }

    /// Tensor bytes decoded so far by this handle.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn raw(&self, name: &str) -> Result<(&TensorMeta, &[u8])> {
        let meta = self.meta(name)?;
        let f = &self.files[meta.file];
        let bytes = &f.mmap[f.data_start + meta.start..f.data_start + meta.end];
        let expected = meta.shape.iter().product::<usize>() * meta.dtype.size_in_bytes();
        if bytes.len() != expected {
            return Err(Error::Safetensors {
                path: f.path.clone(),
                msg: format!(
                    "tensor {name:?} has {} bytes, shape {:?} needs {expected}",
                    bytes.len(),
                    meta.shape
                ),
            });
        }
        self.bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok((meta, bytes))
    }

    /// Loads a floating point tensor as f32, checking its shape.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checked_float(name, shape)?;
        let (meta, bytes) = self.raw(name)?;
        let mut data = Vec::new();
        ringmoe_core::dtype::extend_f32_from_le_bytes(meta.dtype, bytes, &mut data)?;
        Ok(Tensor::from_vec(data, shape.to_vec())?)
    }

    /// The metadata of `name`, which must be a floating point tensor of exactly `shape`.
    fn checked_float(&self, name: &str, shape: &[usize]) -> Result<&TensorMeta> {
        let meta = self.meta(name)?;
        if meta.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: meta.shape.clone(),
            });
        }
        if !meta.dtype.is_float() {
            return Err(Error::TensorDType {
                name: name.to_string(),
                dtype: format!("{:?}", meta.dtype),
            });
        }
        Ok(meta)
    }

    /// Loads an integer tensor (i64 or i32) as i64 values, with its shape.
    pub fn load_i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (meta, bytes) = self.raw(name)?;
        let vals = match meta.dtype {
            DType::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
                .collect(),
            other => {
                return Err(Error::TensorDType {
                    name: name.to_string(),
                    dtype: format!("{other:?} (expected I64 or I32)"),
                });
            }
        };
        Ok((vals, meta.shape.clone()))
    }
}

/// Records every tensor a model load asks [`RandomWeights`] for.
struct Recorder {
    inner: RandomWeights,
    seen: std::sync::Mutex<Vec<(String, Tensor)>>,
}

impl TensorSource for Recorder {
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.inner.load(name, shape)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((name.to_string(), t.clone()));
        }
        Ok(t)
    }
}

/// The benchmark model of docs/performance.md (`benches/engine.rs`, `ringmoe bench make-model`,
/// `gpu-check`): a Mixtral with vocab 32000, hidden 1024, intermediate 2816, 4 layers, 16 heads,
/// 8 KV heads, 8 experts, top-2 — 355 M parameters.
pub fn bench_model_config() -> Value {
    serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
        "num_attention_heads": 16, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
    })
}

/// Writes a Hugging Face model directory — `config.json` as given and `model.safetensors` (f32)
/// holding the [`RandomWeights`] of `seed` — so that `Model::load(dir)` gives the same model as
/// `Model::from_checkpoint(config, &RandomWeights { seed }, ..)`. For tests and benchmarks that
/// need a checkpoint of a shape no fixture has (a long context, say) without a model hub.
pub fn write_random_checkpoint(dir: &Path, config: &Value, seed: u64) -> Result<()> {
    write_random_checkpoint_as(dir, config, seed, DType::F32)
}

/// [`write_random_checkpoint`] with every tensor stored as `dtype` (f32, bf16 or f16; values
/// rounded to nearest-even), as hub checkpoints store them.
pub fn write_random_checkpoint_as(
    dir: &Path,
    config: &Value,
    seed: u64,
    dtype: DType,
) -> Result<()> {
    let (st_dtype, encode, size): (Dtype, fn(f32) -> [u8; 4], usize) = match dtype {
        DType::F32 => (Dtype::F32, f32::to_le_bytes, 4),
        DType::BF16 => (Dtype::BF16, |x| widen(half::bf16::from_f32(x).to_bits()), 2),
        DType::F16 => (Dtype::F16, |x| widen(half::f16::from_f32(x).to_bits()), 2),
        other => {
            return Err(Error::InvalidInput(format!(
                "random checkpoints are f32, bf16 or f16, not {other:?}"
            )));
        }
    };
    let cfg = crate::ModelConfig::from_json(config)?;
    let rec = Recorder {
        inner: RandomWeights { seed },
        seen: std::sync::Mutex::new(Vec::new()),
    };
    crate::Model::from_checkpoint(cfg, &rec, &crate::LoadOptions::default())?;
    let seen = rec
        .seen
        .into_inner()
        .map_err(|_| Error::InvalidInput("weight recorder poisoned".into()))?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| Error::InvalidInput(format!("config: {e}")))?;
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
    let mut names = std::collections::HashSet::new();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = seen
        .into_iter()
        .filter(|(n, _)| names.insert(n.clone()))
        .map(|(n, t)| {
            let shape = t.shape().to_vec();
            let b = t
                .as_slice()
                .iter()
                .flat_map(|&x| encode(x).into_iter().take(size))
                .collect();
            (n, shape, b)
        })
        .collect();
    let path = dir.join("model.safetensors");
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    msg: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Safetensors {
        path: path.clone(),
        msg: e.to_string(),
    })
}

/// A 16-bit value's little-endian bytes in the first two of four.
fn widen(bits: u16) -> [u8; 4] {
    let [a, b] = bits.to_le_bytes();
    [a, b, 0, 0]
}
