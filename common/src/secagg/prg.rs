//! Key derivation and mask expansion.
//!
//! Every key is HKDF-SHA256 of a full 32-byte secret with a context string
//! naming its purpose, the round and the parties, so no key is used twice.
//! Masks are the ChaCha20 keystream under such a key (rand_chacha's SIMD
//! implementation): a full-strength stream cipher keyed by all 256 bits of
//! the agreed secret.

use hkdf::Hkdf;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
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

/// `acc[k] += sign * mask[k]` (mod 2^32, then reduced to `bits`), where
/// `mask` is the keystream under `seed`. Streams in chunks: O(1) extra memory.
pub fn apply_mask(acc: &mut [u32], seed: &[u8; 32], add: bool, bits: u32) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut buf = vec![0u32; CHUNK.min(acc.len())];
    let modmask = modulus_mask(bits);
    for part in acc.chunks_mut(CHUNK) {
        let block = &mut buf[..part.len()];
        rng.fill_u32(block);
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

/// `2^bits - 1`: values live in Z_(2^bits); 2^bits divides 2^32, so
/// reducing after wrapping u32 arithmetic is exact.
pub fn modulus_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    }
}

trait FillU32 {
    fn fill_u32(&mut self, out: &mut [u32]);
}

impl FillU32 for ChaCha20Rng {
    fn fill_u32(&mut self, out: &mut [u32]) {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.fill_bytes(bytes);
        if cfg!(target_endian = "big") {
            for v in out.iter_mut() {
                *v = v.swap_bytes();
            }
        }
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
    fn reduced_bit_widths_stay_in_range() {
        let mut v = vec![0u32; 1000];
        apply_mask(&mut v, &[3; 32], true, 20);
        assert!(v.iter().all(|&x| x < (1 << 20)));
        apply_mask(&mut v, &[3; 32], false, 20);
        assert!(v.iter().all(|&x| x == 0));
    }
}
