//! ggml's byte layouts of the blocks a [`QuantGrid`](super::QuantGrid) writes: the simple
//! blocks (an f16 scale, maybe an f16 offset, packed codes) and the k-quant super-blocks of
//! 256 weights whose block scales are 6-bit multiples of an f16 one.

use half::f16;

use super::{BlockFormat, BlockParams};
use crate::quantize::QuantType;

/// One k-quant super-block's stored parameters.
pub(super) enum SuperParams {
    /// Q4_K (8 blocks of 32, 6-bit steps) or Q2_K (16 blocks of 16, 4-bit steps): `d`, `dmin`
    /// and each block's scale and minimum in steps of them; block `j`'s weights are
    /// `d·sc[j]·q − dmin·mn[j]`.
    WithMins {
        ty: QuantType,
        d: f16,
        dmin: f16,
        scales: Vec<u8>,
        mins: Vec<u8>,
    },
    /// Q3_K: `d` and the 6-bit signed scale of each of its 16 blocks of 16; block `j`'s
    /// weights are `d·sc[j]·q`, `sc[j]` in [−32, 31], `q` in [−4, 3].
    Q3K { d: f16, scales: [i8; 16] },
}

impl SuperParams {
    /// The k-quant encoding of one super-block's real block scales and offsets.
    pub(super) fn of(ty: QuantType, blocks: &[(f32, f32)]) -> SuperParams {
        match ty {
            QuantType::Q3K => Self::q3_k(blocks),
            QuantType::Q2K => Self::with_mins(ty, blocks, 15.0),
            _ => Self::with_mins(ty, blocks, 63.0),
        }
    }

    /// The largest scale (and the largest minimum, offsets being ≤ 0) maps to `top`, the
    /// others round to the nearest step.
    fn with_mins(ty: QuantType, blocks: &[(f32, f32)], top: f32) -> SuperParams {
        let max_d = blocks.iter().map(|b| b.0).fold(0f32, f32::max);
        let max_min = blocks.iter().map(|b| -b.1).fold(0f32, f32::max);
        let (d, dmin) = (f16::from_f32(max_d / top), f16::from_f32(max_min / top));
        let step = |v: f32, unit: f16| -> u8 {
            let unit = unit.to_f32();
            if unit > 0.0 {
                (v / unit).round().clamp(0.0, top) as u8
            } else {
                0
            }
        };
        SuperParams::WithMins {
            ty,
            d,
            dmin,
            scales: blocks.iter().map(|b| step(b.0, d)).collect(),
            mins: blocks.iter().map(|b| step(-b.1, dmin)).collect(),
        }
    }

    /// Q3_K as ggml encodes it: the block scale of largest magnitude maps to −32.
    fn q3_k(blocks: &[(f32, f32)]) -> SuperParams {
        let widest = blocks
            .iter()
            .map(|b| b.0)
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = f16::from_f32(widest / -32.0);
        let mut scales = [0i8; 16];
        if d.to_f32() != 0.0 {
            for (s, &(bd, _)) in scales.iter_mut().zip(blocks) {
                *s = (bd / d.to_f32()).round().clamp(-32.0, 31.0) as i8;
            }
        }
        SuperParams::Q3K { d, scales }
    }

    /// Block `j`'s (scale, offset) as ggml's dequantization computes them.
    pub(super) fn block(&self, j: usize) -> BlockParams {
        match self {
            SuperParams::WithMins {
                d,
                dmin,
                scales,
                mins,
                ..
            } => (
                d.to_f32() * scales[j] as f32,
                -(dmin.to_f32() * mins[j] as f32),
            ),
            SuperParams::Q3K { d, scales } => (d.to_f32() * scales[j] as f32, 0.0),
        }
    }

    /// Appends the super-block of `weights` in ggml's layout.
    pub(super) fn write(&self, f: &BlockFormat, weights: &[f32], out: &mut Vec<u8>) {
        let codes: Vec<i32> = weights
            .chunks(f.width)
            .enumerate()
            .flat_map(|(j, block)| {
                let (d, m) = self.block(j);
                block.iter().map(move |&x| f.code(x, d, m))
            })
            .collect();
        match self {
            SuperParams::WithMins {
                ty: QuantType::Q4K,
                d,
                dmin,
                scales,
                mins,
            } => {
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
                out.extend_from_slice(&pack_q4_k_scales(scales, mins));
                // Two 32-weight blocks interleaved per 32 bytes.
                for pair in codes.chunks(64) {
                    out.extend((0..32).map(|l| (pair[l] | (pair[l + 32] << 4)) as u8));
                }
            }
            SuperParams::WithMins {
                d,
                dmin,
                scales,
                mins,
                ..
            } => {
                // Q2_K: each block's 4-bit scale and minimum in one byte, the codes, d, dmin.
                out.extend(scales.iter().zip(mins).map(|(s, m)| s | (m << 4)));
                write_2_bit_codes(&codes, out);
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
            }
            SuperParams::Q3K { d, scales } => write_q3_k(*d, scales, &codes, out),
        }
    }
}

/// ggml's 12-byte packing of Q4_K's eight 6-bit scales and minimums.
fn pack_q4_k_scales(scales: &[u8], mins: &[u8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..8 {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            out[j] = ls;
            out[j + 4] = lm;
        } else {
            out[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    out
}

/// Appends one Q3_K super-block: the high bits of the 256 codes (`q + 4` in 0..8; bit `j/32`
/// of byte `j%32`), their low two bits (four 32-weight rows per byte, per half of 128), the
/// 16 scales `sc + 32` packed as 4 + 2 bits, then `d`.
fn write_q3_k(d: f16, scales: &[i8; 16], codes: &[i32], out: &mut Vec<u8>) {
    let levels: Vec<i32> = codes.iter().map(|&q| q + 4).collect();
    let mut hmask = [0u8; 32];
    for (j, &l) in levels.iter().enumerate() {
        if l > 3 {
            hmask[j % 32] |= 1 << (j / 32);
        }
    }
    out.extend_from_slice(&hmask);
    write_2_bit_codes(&levels, out);
    let mut packed = [0u8; 12];
    for (j, &s) in scales.iter().enumerate() {
        let l = (s as i32 + 32) as u8;
        if j < 8 {
            packed[j] = l & 0x0f;
        } else {
            packed[j - 8] |= (l & 0x0f) << 4;
        }
        packed[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
    }
    out.extend_from_slice(&packed);
    out.extend_from_slice(&d.to_le_bytes());
}

/// Appends one block in ggml's layout.
pub(super) fn write_block(ty: QuantType, d: f16, m: f16, q: &[i32], out: &mut Vec<u8>) {
    let nibbles = |out: &mut Vec<u8>, bias: i32| {
        for j in 0..16 {
            let lo = ((q[j] + bias) & 0x0f) as u8;
            let hi = ((q[j + 16] + bias) & 0x0f) as u8;
            out.push(lo | (hi << 4));
        }
    };
    match ty {
        QuantType::Q8_0 => {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend(q.iter().map(|&v| v as i8 as u8));
        }
        QuantType::Q4_0 => {
            out.extend_from_slice(&d.to_le_bytes());
            nibbles(out, 8);
        }
        QuantType::Q4_1 => {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&m.to_le_bytes());
            nibbles(out, 0);
        }
        QuantType::Q5_0 => {
            out.extend_from_slice(&d.to_le_bytes());
            let mut qh = 0u32;
            for j in 0..16 {
                qh |= (((q[j] + 16) as u32 >> 4) & 1) << j;
                qh |= (((q[j + 16] + 16) as u32 >> 4) & 1) << (j + 16);
            }
            out.extend_from_slice(&qh.to_le_bytes());
            nibbles(out, 16);
        }
        other => unreachable!("{other:?} blocks are written as k-quant super-blocks"),
    }
}

/// Q2_K's (and Q3_K's low) 2-bit codes: per half of 128 weights, byte `l` holds weights `l`,
/// `l+32`, `l+64` and `l+96` from the lowest bits up.
fn write_2_bit_codes(levels: &[i32], out: &mut Vec<u8>) {
    for half in levels.chunks(128) {
        out.extend((0..32).map(|l| {
            ((half[l] & 3)
                | ((half[l + 32] & 3) << 2)
                | ((half[l + 64] & 3) << 4)
                | ((half[l + 96] & 3) << 6)) as u8
        }));
    }
}

/// Every block's (scale, offset) as ggml's dequantization computes them from a row-major
/// run of `ty`'s super-blocks (Q4_K, Q3_K, Q2_K) — what [`ScaleInit::Ggml`](super::ScaleInit)
/// reads back from ggml's own quantization of the weights.
pub(super) fn read_super_blocks(ty: QuantType, bytes: &[u8]) -> Vec<BlockParams> {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
    let (size, n) = match ty {
        QuantType::Q4K => (144, 8),
        QuantType::Q3K => (110, 16),
        QuantType::Q2K => (84, 16),
        other => unreachable!("{other:?} has no super-blocks"),
    };
    let mut out = Vec::with_capacity(bytes.len() / size * n);
    for b in bytes.chunks_exact(size) {
        let params = match ty {
            QuantType::Q4K => {
                let (scales, mins) = unpack_q4_k_scales(&b[4..16]);
                SuperParams::WithMins {
                    ty,
                    d: f16_at(b, 0),
                    dmin: f16_at(b, 2),
                    scales: scales.to_vec(),
                    mins: mins.to_vec(),
                }
            }
            QuantType::Q3K => {
                let packed = &b[96..108];
                let mut scales = [0i8; 16];
                for (j, s) in scales.iter_mut().enumerate() {
                    let low = (packed[j % 8] >> (4 * (j / 8))) & 0x0f;
                    let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
                    *s = ((low | (high << 4)) as i32 - 32) as i8;
                }
                SuperParams::Q3K {
                    d: f16_at(b, 108),
                    scales,
                }
            }
            // Q2_K
            _ => SuperParams::WithMins {
                ty,
                d: f16_at(b, 80),
                dmin: f16_at(b, 82),
                scales: b[..16].iter().map(|v| v & 0x0f).collect(),
                mins: b[..16].iter().map(|v| v >> 4).collect(),
            },
        };
        out.extend((0..n).map(|j| params.block(j)));
    }
    out
}

/// The inverse of [`pack_q4_k_scales`].
fn unpack_q4_k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            scales[j] = packed[j] & 63;
            mins[j] = packed[j + 4] & 63;
        } else {
            scales[j] = (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4);
            mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        }
    }
    (scales, mins)
}
