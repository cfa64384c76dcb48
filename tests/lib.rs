//! Shared fixtures of the end-to-end tests in `tests/`: a server with its
//! own CA and a node registry on loopback QUIC, and the nodes that enrol
//! with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use fedveil_client::driver::RetryPolicy;
use fedveil_client::enrol::{self, EnrolmentError};
use fedveil_client::{ClientError, ClientOptions, ClientReport, LocalTrainer, Trainer};
use fedveil_ml::data::synthetic::SyntheticConfig;
use fedveil_ml::data::{Shard, Split};
use fedveil_net::pki::{self, CertificateAuthority, NodeIdentity};
use fedveil_net::quic::ServerIdentity;
use fedveil_proto::round::server::SecAggConfig;
use fedveil_proto::round::{CoordinatorConfig, Event};
use fedveil_proto::wire::RoundConfig;
use fedveil_server::{LogObserver, Observer, Registry, RunReport, Server};
use fedveil_settings::Settings;
use tokio::sync::{Mutex, mpsc};

/// A small synthetic image task: 600 training and 100 test examples.
pub fn synthetic() -> Split {
    SyntheticConfig {
        train_examples: 600,
        test_examples: 100,
        ..Default::default()
    }
    .generate(5)
}

/// A running server with its own CA and a node registry in a file.
pub struct Deployment {
    pub addr: SocketAddr,
    pub fingerprint: [u8; 32],
    /// The state database, for opening the registry as another process would.
    pub db: PathBuf,
    pub registry: Arc<Registry>,
    /// A second handle on the CA, to forge what the registry never issued.
    pub ca: CertificateAuthority,
    pub run: tokio::task::JoinHandle<RunReport>,
    pub split: Split,
    events: Mutex<mpsc::UnboundedReceiver<Event>>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.run.abort();
        let _ = std::fs::remove_dir_all(self.db.parent().unwrap());
    }
}

/// Logs like the server does and hands every event to the test.
struct Forward(mpsc::UnboundedSender<Event>);

impl Observer for Forward {
    fn on_event(&mut self, event: &Event) {
        LogObserver.on_event(event);
        let _ = self.0.send(event.clone());
    }
}

/// A server for `rounds` rounds of CNN training, starting once
/// `min_clients` nodes are in.
pub fn deploy(tag: &str, rounds: u64, min_clients: usize, secagg: bool) -> Deployment {
    deploy_with(tag, move |config| {
        config.rounds = rounds;
        config.min_clients = min_clients;
        config.round.secure_aggregation = secagg;
        config.secagg = secagg.then(SecAggConfig::default);
    })
}

/// A server whose coordinator settings `adjust` changes first. The tests
/// state the coordinator's config exactly, so it replaces what the
/// settings would make.
pub fn deploy_with(
    tag: &str,
    adjust: impl FnOnce(&mut CoordinatorConfig) + Send + 'static,
) -> Deployment {
    deploy_limited(tag, fedveil_server::ConnectionLimits::default(), adjust)
}

/// [`deploy_with`], holding early connections to `limits`.
pub fn deploy_limited(
    tag: &str,
    limits: fedveil_server::ConnectionLimits,
    adjust: impl FnOnce(&mut CoordinatorConfig) + Send + 'static,
) -> Deployment {
    deploy_built(tag, |b| b.connection_limits(limits), adjust)
}

/// [`deploy_with`], with the server builder passed through `build` last
/// (connection limits, a deviating server's fault hook...).
pub fn deploy_built(
    tag: &str,
    build: impl FnOnce(fedveil_server::ServerBuilder) -> fedveil_server::ServerBuilder,
    adjust: impl FnOnce(&mut CoordinatorConfig) + Send + 'static,
) -> Deployment {
    let dir = std::env::temp_dir().join(format!("fedveil-enrol-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("state.db");
    let split = synthetic();
    let identity = ServerIdentity::generate(&["localhost".into()]).unwrap();
    let ca_copy = {
        let ca = identity.ca.as_ref().unwrap();
        CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap()
    };
    // Renewal at any time, so tests need not wait for a certificate's
    // last third (the default window is tested on the registry itself).
    let registry = Arc::new(
        Registry::open(&db)
            .unwrap()
            .with_renewal_policy(1.0, fedveil_server::registry::DEFAULT_RENEWAL_GRACE),
    );
    let (events_tx, events) = mpsc::unbounded_channel();
    let settings = Settings {
        seed: 1,
        ..Settings::default()
    };
    // As fedveil-server does: nodes must have the server's kind of data.
    let builder = Server::builder(settings)
        .model(
            fedveil_ml::model::builtin("cnn").unwrap(),
            Arc::clone(&split.test),
        )
        .identity(identity)
        .registry(Arc::clone(&registry))
        .listen("127.0.0.1:0".parse().unwrap())
        .observer(Box::new(Forward(events_tx)))
        .tune(move |config| {
            *config = CoordinatorConfig {
                rounds: 1,
                min_clients: 1,
                fraction: 1.0,
                round_timeout: Duration::from_secs(120),
                max_clients: 100,
                max_examples_per_update: 100_000,
                seed: 1,
                round: RoundConfig {
                    learning_rate: 0.1,
                    seed: 3,
                    ..RoundConfig::default()
                },
                max_failed_rounds: 3,
                ..CoordinatorConfig::default()
            };
            adjust(config);
        });
    let server = build(builder).build().unwrap();
    let addr = server.local_addr();
    let fingerprint = pki::parse_fingerprint(server.ca_fingerprint()).unwrap();
    let run = tokio::spawn(server.run(std::future::pending()));
    Deployment {
        addr,
        fingerprint,
        db,
        registry,
        ca: ca_copy,
        run,
        split,
        events: Mutex::new(events),
    }
}

/// A CNN trainer on a quarter of `split`'s 600 training examples, chosen
/// by `seed`.
pub fn trainer(split: &Split, seed: u64) -> Arc<dyn LocalTrainer> {
    let start = (seed as usize % 4) * 150;
    let shard = Shard {
        data: Arc::clone(&split.train),
        indices: (start..start + 150).collect(),
    };
    Arc::new(Trainer::new("cnn", shard, Device::flex(), seed).unwrap())
}

/// A client endpoint on loopback.
pub fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

impl Deployment {
    /// A one-time enrolment token for `name`.
    pub fn token(&self, name: &str) -> String {
        self.registry
            .issue_token(name, pki::DEFAULT_TOKEN_TTL, pki::unix_now())
            .unwrap()
            .token
    }

    /// Enrols over QUIC as `fedveil-client enroll` does.
    pub async fn enrol(&self, token: &str) -> Result<NodeIdentity, EnrolmentError> {
        enrol::enrol(
            &endpoint(),
            self.addr,
            "localhost",
            self.fingerprint,
            token,
            None,
        )
        .await
    }

    /// A CNN trainer on this deployment's data (see [`trainer`]).
    pub fn trainer(&self, seed: u64) -> Arc<dyn LocalTrainer> {
        trainer(&self.split, seed)
    }

    /// Runs a client with `opts` (no retries: a refusal must not be one).
    pub async fn train(
        &self,
        mut opts: ClientOptions,
        seed: u64,
    ) -> Result<ClientReport, ClientError> {
        opts.retry = RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        };
        fedveil_client::run(&endpoint(), &opts, self.trainer(seed)).await
    }

    /// Trains as the enrolled `identity`.
    pub async fn train_as(&self, identity: &NodeIdentity) -> Result<ClientReport, ClientError> {
        let opts = ClientOptions::enrolled(self.addr, "localhost", identity).unwrap();
        self.train(opts, 0).await
    }

    /// The server's next event, or `None` after `within`.
    pub async fn next_event(&self, within: Duration) -> Option<Event> {
        let mut events = self.events.lock().await;
        tokio::time::timeout(within, events.recv()).await.ok()?
    }
}
