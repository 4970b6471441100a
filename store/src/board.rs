//! The projectors' checkpoints as this process knows them, for read-your-writes waiters.

use crate::{CommitToken, Position};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

/// Each projector's checkpoint per partition, as far as this process has seen it: projector
/// workers in the process post a checkpoint after its transaction commits, and readers of
/// `read.checkpoints` post what they read. Positions only move forward. Waiters subscribe and
/// wake on every move. Cheap to clone; clones share the board.
#[derive(Clone, Debug)]
pub struct CheckpointBoard {
    tx: Arc<watch::Sender<Checkpoints>>,
}

/// A snapshot of the board.
#[derive(Debug, Default)]
pub struct Checkpoints {
    at: HashMap<String, HashMap<i32, Position>>,
}

impl Checkpoints {
    /// Whether `projector`'s checkpoint for the token's partition is at or past the token.
    pub fn passed(&self, projector: &str, token: CommitToken) -> bool {
        self.at
            .get(projector)
            .and_then(|parts| parts.get(&token.partition))
            .is_some_and(|at| *at >= token.position)
    }
}

impl Default for CheckpointBoard {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Checkpoints::default())),
        }
    }
}

impl CheckpointBoard {
    /// `projector`'s checkpoint for `partition` is committed at `at` (ignored if the board
    /// already shows it at or past `at`). Wakes the subscribers when it moves.
    pub fn post(&self, projector: &str, partition: i32, at: Position) {
        self.tx.send_if_modified(|c| {
            let parts = match c.at.get_mut(projector) {
                Some(parts) => parts,
                None => c.at.entry(projector.to_owned()).or_default(),
            };
            match parts.get(&partition) {
                Some(known) if *known >= at => false,
                _ => {
                    parts.insert(partition, at);
                    true
                }
            }
        });
    }

    /// A receiver that sees every later move.
    pub fn subscribe(&self) -> watch::Receiver<Checkpoints> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: CommitToken = CommitToken {
        position: Position { tx: 10, pos: 5 },
        partition: 2,
    };

    #[test]
    fn a_checkpoint_passes_a_token_of_its_projector_and_partition_only_and_never_moves_back() {
        let board = CheckpointBoard::default();
        let mut rx = board.subscribe();
        board.post("conversations", 2, Position { tx: 10, pos: 4 });
        assert!(!rx.borrow_and_update().passed("conversations", TOKEN));
        board.post("conversations", 3, Position { tx: 99, pos: 1 });
        board.post("api_keys", 2, Position { tx: 99, pos: 1 });
        assert!(!rx.borrow_and_update().passed("conversations", TOKEN));
        // A later transaction with a lower position is past the token (commit order).
        board.post("conversations", 2, Position { tx: 11, pos: 1 });
        assert!(rx.has_changed().expect("open"));
        assert!(rx.borrow_and_update().passed("conversations", TOKEN));
        // An older report (a slower reader of the table) neither moves it back nor wakes anyone.
        board.post("conversations", 2, Position { tx: 10, pos: 4 });
        assert!(!rx.has_changed().expect("open"));
        assert!(rx.borrow().passed("conversations", TOKEN));
    }
}
