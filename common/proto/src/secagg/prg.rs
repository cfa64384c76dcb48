//! Key derivation and mask expansion.
//!
//! Every key is HKDF-SHA256 of a full 32-byte secret with a context string
//! naming its purpose, the round and the parties, so no key is used twice.
//! Masks are the AES-256-CTR keystream under such a key (RustCrypto's `aes`,
//! which uses AES-NI when the CPU has it; zero initial counter, since every
//! key is used for one mask only): a full-strength stream cipher keyed by
//! all 256 bits of the agreed secret, about 2-3x faster than ChaCha20 on
//! x86 servers with AES-NI (measured in docs/BENCHMARKS.md). The keystream
//! is seekable, so a long mask is expanded in parallel over disjoint ranges.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use hkdf::Hkdf;
use sha2::Sha256;

/// Values per keystream block handed to the accumulator at once.
const CHUNK: usize = 4096;

/// 32 bytes derived from `secret` for `purpose` in `round` between `a`, `b`.
pub fn derive(secret: &[u8; 32], purpose: &str, round: u64, a: u64, b: u64) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"fedveil secagg+ v1"), secret);
    let mut info = Vec::with_capacity(purpose.len() + 24);
    info.extend_from_slice(purpose.as_bytes());
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&a.to_le_bytes());
    info.extend_from_slice(&b.to_le_bytes());
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// Seed of the pairwise mask between `i` and `j` (symmetric in i, j).
pub fn pairwise_seed(shared_secret: &[u8; 32], round: u64, i: u64, j: u64) -> [u8; 32] {
    derive(shared_secret, "pairwise-mask", round, i.min(j), i.max(j))
}

/// Seed of client `id`'s self mask.
pub fn self_mask_seed(secret: &[u8; 32], round: u64, id: u64) -> [u8; 32] {
    derive(secret, "self-mask", round, id, id)
}

/// AEAD key for shares sent between `i` and `j` (symmetric in i, j).
pub fn share_key(shared_secret: &[u8; 32], round: u64, i: u64, j: u64) -> [u8; 32] {
    derive(shared_secret, "share-encryption", round, i.min(j), i.max(j))
}

/// AES-256 in counter mode, 128-bit big-endian counter (NIST SP 800-38A).
type MaskCipher = ctr::Ctr128BE<Aes256>;

/// One mask to add (`add`) or subtract: the keystream under `seed`.
pub type MaskJob = ([u8; 32], bool);

/// `acc[k] += sign * mask[k]` (mod 2^32, then reduced to `bits`), where
/// `mask` is the keystream under `seed`. Streams in chunks: O(1) extra memory.
pub fn apply_mask(acc: &mut [u32], seed: &[u8; 32], add: bool, bits: u32) {
    apply_mask_at(acc, 0, seed, add, bits);
}

/// As [`apply_mask`] for the slice of a longer vector that starts at index
/// `offset` (the keystream is sought to that word).
pub fn apply_mask_at(acc: &mut [u32], offset: usize, seed: &[u8; 32], add: bool, bits: u32) {
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    cipher.seek(offset as u64 * 4);
    let mut buf = vec![0u32; CHUNK.min(acc.len())];
    let modmask = modulus_mask(bits);
    for part in acc.chunks_mut(CHUNK) {
        let block = &mut buf[..part.len()];
        block.fill(0);
        cipher.apply_keystream(bytemuck::cast_slice_mut(block));
        if cfg!(target_endian = "big") {
            for v in block.iter_mut() {
                *v = v.swap_bytes();
            }
        }
        if add {
            for (a, m) in part.iter_mut().zip(block.iter()) {
                *a = a.wrapping_add(*m) & modmask;
            }
        } else {
            for (a, m) in part.iter_mut().zip(block.iter()) {
                *a = a.wrapping_sub(*m) & modmask;
            }
        }
    }
}

/// Smallest slice worth its own thread.
const MIN_VALUES_PER_THREAD: usize = 1 << 16;

/// Applies every mask in `masks` to `acc`, splitting the vector into one
/// contiguous range per core (each thread seeks every keystream to its
/// range), so the result is exactly that of applying them one by one.
pub fn apply_masks(acc: &mut [u32], masks: &[MaskJob], bits: u32) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(acc.len() / MIN_VALUES_PER_THREAD).max(1);
    if threads == 1 {
        for (seed, add) in masks {
            apply_mask(acc, seed, *add, bits);
        }
        return;
    }
    let per = acc.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (i, part) in acc.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (seed, add) in masks {
                    apply_mask_at(part, i * per, seed, *add, bits);
                }
            });
        }
    });
}

/// `2^bits - 1`: values live in Z_(2^bits); 2^bits divides 2^32, so
/// reducing after wrapping u32 arithmetic is exact.
pub fn modulus_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cancel_and_depend_on_every_input() {
        let seed = derive(&[7; 32], "x", 1, 2, 3);
        let mut v = vec![5u32; 10_000];
        apply_mask(&mut v, &seed, true, 32);
        assert_ne!(v, vec![5u32; 10_000]);
        apply_mask(&mut v, &seed, false, 32);
        assert_eq!(v, vec![5u32; 10_000]);
        assert_ne!(
            derive(&[7; 32], "x", 1, 2, 3),
            derive(&[7; 32], "x", 2, 2, 3)
        );
        assert_ne!(
            derive(&[7; 32], "x", 1, 2, 3),
            derive(&[7; 32], "y", 1, 2, 3)
        );
        assert_ne!(
            derive(&[7; 32], "x", 1, 2, 3),
            derive(&[8; 32], "x", 1, 2, 3)
        );
        assert_eq!(
            pairwise_seed(&[1; 32], 4, 9, 2),
            pairwise_seed(&[1; 32], 4, 2, 9)
        );
    }

    #[test]
    fn parallel_and_sought_masks_equal_the_sequential_stream() {
        let jobs: Vec<MaskJob> = (0..5u8).map(|i| ([i; 32], i % 2 == 0)).collect();
        // Long enough to split over threads, with a ragged tail.
        let len = 3 * MIN_VALUES_PER_THREAD + 12_345;
        let start: Vec<u32> = (0..len as u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let mut one_by_one = start.clone();
        for (seed, add) in &jobs {
            apply_mask(&mut one_by_one, seed, *add, 32);
        }
        let mut parallel = start.clone();
        apply_masks(&mut parallel, &jobs, 32);
        assert_eq!(parallel, one_by_one);
        // Seeking: a tail masked on its own equals the tail of the whole.
        let mut whole = vec![0u32; 10_000];
        apply_mask(&mut whole, &[9; 32], true, 32);
        let mut tail = vec![0u32; 3_333];
        apply_mask_at(&mut tail, 10_000 - 3_333, &[9; 32], true, 32);
        assert_eq!(&whole[10_000 - 3_333..], &tail[..]);
    }

    #[test]
    fn keystream_is_aes256_ctr() {
        // Block 0 of the keystream is AES-256(key = 0, counter block = 0):
        // dc95c078a2408989ad48a21492842087 (FIPS-197-style known answer).
        let mut v = vec![0u32; 4];
        apply_mask(&mut v, &[0; 32], true, 32);
        let bytes: Vec<u8> = v.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(hex::encode(bytes), "dc95c078a2408989ad48a21492842087");
    }

    #[test]
    fn reduced_bit_widths_stay_in_range() {
        let mut v = vec![0u32; 1000];
        apply_mask(&mut v, &[3; 32], true, 20);
        assert!(v.iter().all(|&x| x < (1 << 20)));
        apply_mask(&mut v, &[3; 32], false, 20);
        assert!(v.iter().all(|&x| x == 0));
    }
}
