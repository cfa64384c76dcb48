//! The thin async driver around [`ClientSession`]: one QUIC connection, one
//! stream, training on a blocking thread.

use std::net::SocketAddr;
use std::sync::Arc;

use fedveil_common::model::ModelError;
use fedveil_common::net::{self, CLOSE_OK, MessageReader, NetError};
use fedveil_common::round::{ClientEvent, ClientSession, SessionError};
use fedveil_common::wire::{FrameLimits, Message, ReasonCode};
use tokio::sync::Semaphore;

use crate::trainer::LocalTrainer;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub server: SocketAddr,
    /// Name checked against the server certificate (a DNS name or an IP).
    pub server_name: String,
    pub node_name: String,
    /// Bounds concurrent local training (simulations share one pool).
    pub training_slots: Option<Arc<Semaphore>>,
}

/// What a client did in a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientReport {
    pub client_id: Option<u64>,
    pub rounds_trained: u64,
    /// Rounds the server completed, from its goodbye.
    pub server_rounds_completed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("local model: {0}")]
    Model(#[from] ModelError),
    #[error("the server closed the connection before the run ended")]
    ServerClosed,
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Net(NetError::Connection(e))
    }
}

/// Joins the server at `opts.server` and trains until the run ends.
pub async fn run(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
    trainer: Arc<dyn LocalTrainer>,
) -> Result<ClientReport, ClientError> {
    let connection = endpoint
        .connect(opts.server, &opts.server_name)
        .map_err(NetError::from)?
        .await?;
    let (mut send, recv) = connection.open_bi().await?;
    let mut reader = MessageReader::new(recv, FrameLimits::for_model(trainer.spec().param_count));
    let mut session = ClientSession::new(
        &opts.node_name,
        trainer.spec().clone(),
        trainer.num_examples() as u64,
        ClientSession::os_rng(),
    );
    let mut report = ClientReport {
        client_id: None,
        rounds_trained: 0,
        server_rounds_completed: 0,
        bytes_sent: 0,
        bytes_received: 0,
    };
    let result = async {
        loop {
            while let Some(msg) = session.poll_transmit() {
                report.bytes_sent += net::write_message(&mut send, &msg).await?;
            }
            let Some(msg) = reader.next().await? else {
                return Err(ClientError::ServerClosed);
            };
            report.bytes_received = reader.bytes_read();
            session.handle_message(msg)?;
            while let Some(event) = session.poll_event() {
                match event {
                    ClientEvent::Admitted { client_id } => {
                        report.client_id = Some(client_id);
                        tracing::info!(node = %opts.node_name, client_id, "admitted");
                    }
                    ClientEvent::Train { round, config, global_model } => {
                        let _permit = match &opts.training_slots {
                            Some(slots) => Some(slots.clone().acquire_owned().await.expect("semaphore open")),
                            None => None,
                        };
                        let t = Arc::clone(&trainer);
                        let trained = tokio::task::spawn_blocking(move || t.train_round(round, &config, &global_model))
                            .await
                            .expect("training does not panic");
                        match trained {
                            Ok((update, eval)) => {
                                tracing::debug!(node = %opts.node_name, round, loss = update.train_loss, "trained");
                                session.submit(update, Some(eval))?;
                                report.rounds_trained += 1;
                            }
                            Err(err) => {
                                tracing::warn!(node = %opts.node_name, round, %err, "local training failed");
                                let msg = Message::error(ReasonCode::Internal, format!("round {round}: {err}"));
                                report.bytes_sent += net::write_message(&mut send, &msg).await?;
                            }
                        }
                    }
                    ClientEvent::ServerError { code, detail } => {
                        tracing::warn!(node = %opts.node_name, ?code, %detail, "server refused a message");
                    }
                    ClientEvent::Finished { rounds_completed, reason } => {
                        tracing::info!(node = %opts.node_name, rounds_completed, %reason, "run finished");
                        report.server_rounds_completed = rounds_completed;
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    report.client_id = session.client_id();
    let _ = send.finish();
    connection.close(CLOSE_OK.into(), b"bye");
    result.map(|()| report)
}
