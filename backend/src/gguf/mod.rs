//! A small, dependency-free GGUF reader: header, metadata and tensor table.
//!
//! llama.cpp answers a broken file with a null pointer and a line on stderr. Reading the file
//! ourselves first turns "missing", "not GGUF", "truncated" and "unknown architecture" into
//! typed [`Error`]s, and gives `geek model info` its facts without loading any weights.
//!
//! ```no_run
//! let info = geek_backend::gguf::GgufFile::open("model.gguf")?;
//! println!("{} with {} parameters", info.architecture().unwrap_or("?"), info.parameter_count());
//! # Ok::<(), geek_backend::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// `f32` or `f64`.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    String(String),
    /// An array of at most [`MAX_ARRAY_ITEMS`] values.
    Array(Vec<Value>),
    /// A longer array, kept by its length only (its bytes are checked and skipped, so a huge
    /// array costs no memory).
    LongArray {
        /// The GGUF type id of the elements.
        elem_type: u32,
        /// Number of elements.
        len: u64,
    },
}

/// Arrays longer than this are read as [`Value::LongArray`].
pub const MAX_ARRAY_ITEMS: u64 = 1 << 16;

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The number of elements of an array value.
    pub fn array_len(&self) -> Option<u64> {
        match self {
            Value::Array(items) => Some(items.len() as u64),
            Value::LongArray { len, .. } => Some(*len),
            _ => None,
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost first (ggml order).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub type_id: u32,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (validated by [`GgufFile::open`] not to overflow).
    pub fn n_elements(&self) -> u64 {
        self.checked_elements().unwrap_or(u64::MAX)
    }

    fn checked_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// The ggml type name (`Q4_1`, `F32`, …) or `type<N>` for ids this reader does not know.
    pub fn type_name(&self) -> String {
        ggml_type(self.type_id)
            .map(|t| t.name.to_string())
            .unwrap_or_else(|| format!("type{}", self.type_id))
    }

    /// Size of the tensor's data in bytes, when the type is known.
    pub fn n_bytes(&self) -> Option<u64> {
        let t = ggml_type(self.type_id)?;
        (self.checked_elements()? / t.block_size).checked_mul(t.type_size)
    }
}

/// Block layout of a ggml tensor type.
#[derive(Debug, Clone, Copy)]
pub struct GgmlType {
    /// Name as llama.cpp prints it.
    pub name: &'static str,
    /// Elements per block.
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
}

/// Block layout of the ggml type `id`, for the types this crate knows.
pub fn ggml_type(id: u32) -> Option<GgmlType> {
    let (name, block_size, type_size) = match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    };
    Some(GgmlType {
        name,
        block_size,
        type_size,
    })
}

/// The parsed header, metadata and tensor table of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Metadata key → value, sorted by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// File size in bytes.
    pub file_size: u64,
}

impl GgufFile {
    /// Read and validate a GGUF file's header, metadata and tensor table. Every tensor of a
    /// known type must lie inside the file, so a truncated download is caught here.
    // Longer than 80 lines: reads the format in file order (header, metadata, tensor table, data offset) with a bound check at every field; cut into pieces, the order and the checks would be harder to follow.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ModelNotFound(path))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let file_size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut r = Reader {
            inner: BufReader::new(file),
            pos: 0,
            size: file_size,
        };
        let corrupt = |reason: String| Error::CorruptGguf {
            path: path.clone(),
            reason,
        };

        let mut magic = [0u8; 4];
        let n = r.read_up_to(&mut magic).map_err(|e| Error::io(&path, e))?;
        if n > 0 && n < 4 && magic[..n] == b"GGUF"[..n] {
            return Err(corrupt(format!("file is only {n} bytes long")));
        }
        if n < 4 || &magic != b"GGUF" {
            return Err(Error::NotGguf {
                path,
                magic: magic[..n].to_vec(),
            });
        }
        let version = r.u32().map_err(corrupt)?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.u64().map_err(corrupt)?;
        let n_kv = r.u64().map_err(corrupt)?;
        // Every tensor-table entry and key-value pair takes at least 8 bytes on disk.
        if n_tensors.saturating_add(n_kv).saturating_mul(8) > file_size {
            return Err(corrupt(format!(
                "header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file can hold"
            )));
        }

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string().map_err(corrupt)?;
            let ty = r.u32().map_err(corrupt)?;
            let value = r
                .value(ty, 0)
                .map_err(|e| corrupt(format!("key {key:?}: {e}")))?;
            metadata.insert(key, value);
        }

        // Grown as entries are read (each takes file bytes), never sized by the header's claim.
        let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
        for _ in 0..n_tensors {
            let name = r.string().map_err(corrupt)?;
            let n_dims = r.u32().map_err(corrupt)?;
            if n_dims > 8 {
                return Err(corrupt(format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(corrupt)?;
            let type_id = r.u32().map_err(corrupt)?;
            let offset = r.u64().map_err(corrupt)?;
            let tensor = TensorInfo {
                name,
                dims,
                type_id,
                offset,
            };
            let n = tensor.checked_elements().ok_or_else(|| {
                corrupt(format!(
                    "tensor {:?} has shape {:?}, whose element count overflows",
                    tensor.name, tensor.dims
                ))
            })?;
            if let Some(t) = ggml_type(type_id) {
                if n % t.block_size != 0 {
                    return Err(corrupt(format!(
                        "tensor {:?} has {n} elements, not a multiple of {}'s block of {}",
                        tensor.name, t.name, t.block_size
                    )));
                }
            }
            tensors.push(tensor);
        }
        let total = tensors
            .iter()
            .try_fold(0u64, |acc, t| acc.checked_add(t.n_elements()));
        if total.is_none() {
            return Err(corrupt("the tensors' element counts overflow".into()));
        }

        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(corrupt(format!(
                        "general.alignment is {v:?}, not a power of two up to 1 MiB"
                    )))
                }
            },
        };
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            if let Some(bytes) = t.n_bytes() {
                let end = data_offset
                    .checked_add(t.offset)
                    .and_then(|o| o.checked_add(bytes));
                if end.is_none_or(|end| end > file_size) {
                    return Err(corrupt(format!(
                        "tensor {:?} ends past the end of the file ({} bytes): truncated?",
                        t.name, file_size
                    )));
                }
            }
        }

        Ok(GgufFile {
            path,
            version,
            metadata,
            tensors,
            data_offset,
            file_size,
        })
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(Value::as_str)
    }

    /// An integer metadata value.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }

    /// Training context length (`<arch>.context_length`).
    pub fn context_length(&self) -> Option<u64> {
        self.get_u64(&format!("{}.context_length", self.architecture()?))
    }

    /// Bytes of a KV cache of `n_ctx` cells with `elem_bytes`-byte elements, from the
    /// architecture's layer, head and width keys (`None` when they are missing). Head counts
    /// may be one number or one per layer (deci, pruned models).
    pub fn kv_cache_bytes(&self, n_ctx: u64, elem_bytes: u64) -> Option<u64> {
        let arch = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let layers = self.get_u64(&key("block_count"))?;
        // Per layer: the number, or the layer's entry of an array of them.
        let per_layer = |k: &str| -> Option<Vec<u64>> {
            match self.metadata.get(&key(k))? {
                Value::Array(items) if items.len() as u64 == layers => {
                    items.iter().map(Value::as_u64).collect()
                }
                v => Some(vec![v.as_u64()?; usize::try_from(layers).ok()?]),
            }
        };
        let heads = per_layer("attention.head_count")?;
        let kv_heads = per_layer("attention.head_count_kv").unwrap_or_else(|| heads.clone());
        let width = self.get_u64(&key("embedding_length"))?;
        let first_heads = heads.iter().copied().find(|&h| h > 0).unwrap_or(1);
        let k_len = self
            .get_u64(&key("attention.key_length"))
            .unwrap_or(width / first_heads);
        let v_len = self
            .get_u64(&key("attention.value_length"))
            .unwrap_or(width / first_heads);
        let heads_total = kv_heads
            .iter()
            .try_fold(0u64, |sum, &h| sum.checked_add(h))?;
        heads_total
            .checked_mul(n_ctx)?
            .checked_mul(k_len.checked_add(v_len)?)?
            .checked_mul(elem_bytes)
    }

    /// The chat template stored in the file (`tokenizer.chat_template`).
    pub fn chat_template(&self) -> Option<&str> {
        self.get_str("tokenizer.chat_template")
    }

    /// Total number of weights over all tensors.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::n_elements).sum()
    }

    /// How many tensors use each ggml type, e.g. `{"Q4_1": 210, "F32": 61}`.
    pub fn tensor_type_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for t in &self.tensors {
            *counts.entry(t.type_name()).or_insert(0) += 1;
        }
        counts
    }

    /// Whether llama.cpp implements this file's architecture.
    pub fn check_architecture(&self) -> Result<()> {
        match self.architecture() {
            Some(arch) if crate::arch::is_supported(arch) => Ok(()),
            Some(arch) => Err(Error::UnsupportedArchitecture {
                path: self.path.clone(),
                architecture: arch.to_string(),
            }),
            None => Err(Error::CorruptGguf {
                path: self.path.clone(),
                reason: "no general.architecture key".into(),
            }),
        }
    }
}

/// A byte reader that knows how much of the file is left, so that lengths read from a garbage
/// file are rejected before anything is allocated for them.
struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
}

type ReadResult<T> = std::result::Result<T, String>;

impl<R: Read> Reader<R> {
    fn read_up_to(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn exact(&mut self, buf: &mut [u8]) -> ReadResult<()> {
        let n = self
            .read_up_to(buf)
            .map_err(|e| format!("read failed: {e}"))?;
        if n < buf.len() {
            return Err(format!("unexpected end of file at byte {}", self.pos));
        }
        Ok(())
    }

    fn remaining(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn u32(&mut self) -> ReadResult<u32> {
        let mut b = [0; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> ReadResult<u64> {
        let mut b = [0; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> ReadResult<String> {
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(format!(
                "string of {len} bytes at byte {} runs past the end of the file",
                self.pos
            ));
        }
        let mut buf = vec![0; len as usize];
        self.exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> ReadResult<Value> {
        let mut fixed = |n: usize| -> ReadResult<[u8; 8]> {
            let mut b = [0u8; 8];
            self.exact(&mut b[..n])?;
            Ok(b)
        };
        Ok(match ty {
            0 => Value::U64(fixed(1)?[0] as u64),
            1 => Value::I64(fixed(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(fixed(2)?[..2].try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(fixed(2)?[..2].try_into().unwrap()) as i64),
            4 => Value::U64(u32::from_le_bytes(fixed(4)?[..4].try_into().unwrap()) as u64),
            5 => Value::I64(i32::from_le_bytes(fixed(4)?[..4].try_into().unwrap()) as i64),
            6 => Value::F64(f32::from_le_bytes(fixed(4)?[..4].try_into().unwrap()) as f64),
            7 => Value::Bool(fixed(1)?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let (elem_ty, len) = self.array_header(depth)?;
                if len > MAX_ARRAY_ITEMS {
                    for _ in 0..len {
                        self.skip_value(elem_ty, depth + 1)?;
                    }
                    return Ok(Value::LongArray {
                        elem_type: elem_ty,
                        len,
                    });
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(fixed(8)?)),
            11 => Value::I64(i64::from_le_bytes(fixed(8)?)),
            12 => Value::F64(f64::from_le_bytes(fixed(8)?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }

    /// Reads past one value without keeping it.
    fn skip_value(&mut self, ty: u32, depth: u32) -> ReadResult<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.u64()?,
            9 => {
                let (elem_ty, len) = self.array_header(depth)?;
                for _ in 0..len {
                    self.skip_value(elem_ty, depth + 1)?;
                }
                return Ok(());
            }
            other => return Err(format!("unknown metadata value type {other}")),
        };
        self.skip(fixed)
    }

    /// An array's element type and length, checked against the nesting limit and the bytes
    /// left (every element takes at least one).
    fn array_header(&mut self, depth: u32) -> ReadResult<(u32, u64)> {
        if depth > 2 {
            return Err("arrays nested too deeply".into());
        }
        let elem_ty = self.u32()?;
        let len = self.u64()?;
        if len > self.remaining() {
            return Err(format!("array of {len} elements cannot fit in the file"));
        }
        Ok((elem_ty, len))
    }

    fn skip(&mut self, n: u64) -> ReadResult<()> {
        if n > self.remaining() {
            return Err(format!(
                "a value of {n} bytes at byte {} runs past the end of the file",
                self.pos
            ));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| format!("read failed: {e}"))?;
        self.pos += copied;
        if copied < n {
            return Err(format!("unexpected end of file at byte {}", self.pos));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
