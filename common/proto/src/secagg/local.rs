//! One whole SecAgg+ round run in memory, every client and the server in
//! this process with messages handed over directly: the reference harness
//! for the property tests and the benchmarks. Dropouts are scripted per
//! stage; time spent on the client and the server side is measured apart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::client::{ClientError, SecAggClient};
use super::server::{Abort, Outcome, SecAggServer};
use crate::wire::{RoundConfig, SecAgg, SecAggParams};

/// Clients that vanish before each stage.
#[derive(Debug, Clone, Default)]
pub struct Drops {
    /// Vanish before advertising keys.
    pub before_keys: BTreeSet<u64>,
    /// Vanish before sharing keys.
    pub before_shares: BTreeSet<u64>,
    /// Vanish before sending the masked input.
    pub before_masked: BTreeSet<u64>,
    /// Vanish before unmasking.
    pub before_unmask: BTreeSet<u64>,
}

impl Drops {
    /// Whether no client vanishes.
    pub fn is_empty(&self) -> bool {
        self.before_keys.is_empty()
            && self.before_shares.is_empty()
            && self.before_masked.is_empty()
            && self.before_unmask.is_empty()
    }
}

/// What a local round produced.
pub struct LocalRound {
    /// The sum, or why the round aborted.
    pub result: Result<Outcome, Abort>,
    /// Clients that sent a masked input.
    pub masked_by: BTreeSet<u64>,
    /// Total time spent in client code (all clients).
    pub client_time: Duration,
    /// Time spent in server code.
    pub server_time: Duration,
    /// Bytes of protocol payload each client sent, on average (keys,
    /// encrypted shares, masked vector, revealed shares; no framing).
    pub bytes_per_client: f64,
}

/// Runs one round of SecAgg+ over `inputs` (update, example count) with the
/// given dropouts. `now` is the clock the time spent on either side is
/// measured with (`Instant::now` in benchmarks): the crate itself never
/// reads the clock.
pub fn run_round(
    params: &SecAggParams,
    round: u64,
    inputs: &BTreeMap<u64, (Vec<f32>, u64)>,
    drops: &Drops,
    seed: u64,
    now: fn() -> Instant,
) -> LocalRound {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let ids: Vec<u64> = inputs.keys().copied().collect();
    let d = inputs.values().next().map_or(0, |v| v.0.len());
    let (mut client_time, mut server_time) = (Duration::ZERO, Duration::ZERO);
    let mut sent_bytes = 0usize;
    let started = now();
    let digest = super::round_digest(round, &RoundConfig::default(), &[]);
    let (mut server, setups) =
        SecAggServer::new(round, params.clone(), &ids, d, seed, digest).expect("valid parameters");
    server_time += started.elapsed();

    let mut clients: BTreeMap<u64, SecAggClient> = BTreeMap::new();
    let mut masked_by = BTreeSet::new();
    let deliver =
        |server: &mut SecAggServer, from: u64, msg: SecAgg, server_time: &mut Duration| {
            let t = now();
            server
                .handle(from, msg)
                .expect("honest clients are not refused");
            *server_time += t.elapsed();
        };
    for (id, setup) in &setups {
        let t = now();
        let (c, adv) =
            SecAggClient::new(*id, round, setup, digest, &mut rng, None).expect("valid setup");
        client_time += t.elapsed();
        if drops.before_keys.contains(id) {
            server.drop_client(*id);
            continue;
        }
        sent_bytes += 64;
        deliver(&mut server, *id, adv, &mut server_time);
        clients.insert(*id, c);
    }
    let mut outcome = None;
    for stage in 0..5 {
        let t = now();
        let advanced = server.advance();
        server_time += t.elapsed();
        match advanced {
            Ok(Some(o)) => {
                outcome = Some(Ok(o));
                break;
            }
            Err(e) => {
                outcome = Some(Err(e));
                break;
            }
            Ok(None) => {}
        }
        let out: Vec<(u64, SecAgg)> = std::iter::from_fn(|| server.poll_transmit()).collect();
        let gone = match stage {
            0 => &drops.before_shares,
            1 => &drops.before_masked,
            2 => &drops.before_unmask,
            _ => &BTreeSet::new(),
        };
        for (to, msg) in out {
            if gone.contains(&to) {
                server.drop_client(to);
                continue;
            }
            let c = clients
                .get_mut(&to)
                .expect("server writes to known clients");
            let t = now();
            let reply = match msg {
                SecAgg::PeerKeys { peers, .. } => c.on_peer_keys(peers, &mut rng, None),
                SecAgg::PeerShares { shares, .. } => {
                    // Too few neighbours shared with it: an honest client
                    // withdraws rather than mask with too few masks.
                    if let Err(ClientError::TooFewShares { .. }) = c.on_peer_shares(shares) {
                        server.drop_client(to);
                        continue;
                    }
                    let (v, n) = &inputs[&to];
                    masked_by.insert(to);
                    c.mask(v, *n, d)
                }
                SecAgg::ConsistencyCheck { survivors, .. } => {
                    c.on_consistency_check(survivors, None)
                }
                SecAgg::UnmaskRequest { signatures, .. } => c.on_unmask_request(&signatures, None),
                other => panic!("unexpected {}", other.kind()),
            }
            .expect("honest client");
            client_time += t.elapsed();
            sent_bytes += payload_bytes(&reply);
            deliver(&mut server, to, reply, &mut server_time);
        }
    }
    LocalRound {
        result: outcome.expect("the unmask stage ends the round"),
        masked_by,
        client_time,
        server_time,
        bytes_per_client: sent_bytes as f64 / ids.len().max(1) as f64,
    }
}

fn payload_bytes(msg: &SecAgg) -> usize {
    match msg {
        SecAgg::Shares { shares, .. } => shares.iter().map(|s| 8 + s.ciphertext.len()).sum(),
        SecAgg::MaskedInput { masked, .. } => 4 * masked.len(),
        SecAgg::UnmaskShares {
            self_mask,
            mask_key,
            ..
        } => 40 * (self_mask.len() + mask_key.len()),
        SecAgg::SurvivorsSigned { signature, .. } => signature.len(),
        _ => 0,
    }
}
