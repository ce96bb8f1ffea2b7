//! The worker threads behind an epoch (indexed or streamed): one named thread
//! and one bounded channel per worker, a shared stop flag, and a drop that
//! stops and joins them all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// `n` worker threads, each sending `T`s into its own channel.
pub(crate) struct Workers<T> {
    receivers: Vec<Receiver<T>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl<T: Send + 'static> Workers<T> {
    /// Starts `n` threads named `{name}-{w}`; thread `w` runs `body(w)` with
    /// its sender (capacity `capacity`) and the stop flag, which it should
    /// check between items. A thread that cannot be started is replaced by
    /// a channel holding `spawn_failed(message)`.
    pub(crate) fn spawn<B>(
        n: usize,
        capacity: usize,
        name: &str,
        mut body: impl FnMut(usize) -> B,
        spawn_failed: impl Fn(String) -> T,
    ) -> Self
    where
        B: FnOnce(&SyncSender<T>, &AtomicBool) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for w in 0..n {
            let (tx, rx) = sync_channel::<T>(capacity);
            let run = body(w);
            let flag = Arc::clone(&stop);
            match std::thread::Builder::new()
                .name(format!("{name}-{w}"))
                .spawn(move || run(&tx, &flag))
            {
                Ok(h) => {
                    handles.push(h);
                    receivers.push(rx);
                }
                Err(e) => {
                    let (tx, rx) = sync_channel(1);
                    let _ = tx.send(spawn_failed(format!("cannot spawn {name} thread: {e}")));
                    receivers.push(rx);
                }
            }
        }
        Self {
            receivers,
            handles,
            stop,
        }
    }
}

impl<T> Workers<T> {
    /// How many workers (started or replaced by their error).
    pub(crate) fn len(&self) -> usize {
        self.receivers.len()
    }

    /// The next item of worker `w`; `None` once it stopped sending.
    pub(crate) fn recv(&self, w: usize) -> Option<T> {
        self.receivers[w].recv().ok()
    }
}

impl<T> Drop for Workers<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks workers waiting in `send`.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
