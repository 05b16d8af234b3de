//! The in-process transport: N ranks in one process (threads), one channel per ordered pair.
//! Payloads move through the channels, so nothing is copied. Dropping a rank's communicator drops
//! its senders, which its peers see at once as a lost peer.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use crate::transport::{Message, Transport};
use crate::{CommError, Communicator, Result};

struct InProc {
    rank: usize,
    world: usize,
    /// `to[j]`: sender to rank j (`None` once shut down, and for self).
    to: Mutex<Vec<Option<Sender<Message>>>>,
    /// `from[j]`: receiver from rank j.
    from: Vec<Mutex<Option<Receiver<Message>>>>,
}

/// Creates `world` connected communicators, rank `i` at index `i`.
pub fn in_process(world: usize, timeout: Duration) -> Vec<Communicator> {
    // senders[i][j] / receivers[j][i]: the channel from i to j.
    let mut senders: Vec<Vec<Option<Sender<Message>>>> = (0..world)
        .map(|_| (0..world).map(|_| None).collect())
        .collect();
    let mut receivers: Vec<Vec<Option<Receiver<Message>>>> = (0..world)
        .map(|_| (0..world).map(|_| None).collect())
        .collect();
    for i in 0..world {
        for j in 0..world {
            if i != j {
                let (tx, rx) = channel();
                senders[i][j] = Some(tx);
                receivers[j][i] = Some(rx);
            }
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| {
            let t = InProc {
                rank,
                world,
                to: Mutex::new(to),
                from: from.into_iter().map(Mutex::new).collect(),
            };
            Communicator::new(Box::new(t), timeout)
        })
        .collect()
}

impl Transport for InProc {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn post(&self, peer: usize, msg: Message) -> Result<()> {
        let to = self.to.lock().unwrap_or_else(|p| p.into_inner());
        let lost = |reason: &str| CommError::PeerLost {
            rank: self.rank,
            peer,
            reason: reason.into(),
        };
        match to.get(peer).and_then(Option::as_ref) {
            Some(tx) => tx.send(msg).map_err(|_| lost("peer has exited")),
            None => Err(lost("link is shut down")),
        }
    }

    fn next(&self, peer: usize, timeout: Duration) -> Result<Message> {
        let rx = self.from.get(peer).ok_or(CommError::BadPeer {
            rank: self.rank,
            peer,
            world: self.world,
        })?;
        let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
        let lost = |reason: &str| CommError::PeerLost {
            rank: self.rank,
            peer,
            reason: reason.into(),
        };
        match rx.as_ref() {
            None => Err(lost("link is shut down")),
            Some(rx) => rx.recv_timeout(timeout).map_err(|e| match e {
                RecvTimeoutError::Disconnected => lost("peer has exited"),
                RecvTimeoutError::Timeout => CommError::Timeout {
                    rank: self.rank,
                    peer,
                    tag: crate::Tag::new(0, 0, 0, crate::Kind::Data),
                    timeout,
                },
            }),
        }
    }

    fn shutdown(&self) {
        let mut to = self.to.lock().unwrap_or_else(|p| p.into_inner());
        to.iter_mut().for_each(|s| *s = None);
    }

    fn name(&self) -> &'static str {
        "inproc"
    }
}
