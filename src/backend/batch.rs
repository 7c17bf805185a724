//! Admission script calls that arrive together share one call: the batcher.
//!
//! Every request's script call is sent to one task per backend (single node only: on a
//! cluster a call may touch one slot, so admission keeps its per-slot calls). The task
//! takes the first request, yields once so that the requests made in the same tick of the
//! runtime join it, then drains what is queued — at most [`MAX_BATCH`] — and sends it as
//! **one** call of `gcra_batch.lua`, which decides each request exactly as `gcra.lua` would
//! alone, in queue order. A batch of one is sent as today's `gcra.lua` call. The task does
//! not wait for a batch's reply before forming the next: batches are pipelined on the
//! multiplexed connection like single calls were, and the time Redis spends per request
//! falls (one script call, one read of each distinct key, one write of each written key per
//! batch; see `gcra_batch.lua`).
//!
//! The raw reply of each request goes back on its own oneshot; the caller checks it and
//! feeds the health state exactly as for a call of its own, and its own
//! `limits.redis_timeout` bounds its wait from the moment it queued: a late batch answers
//! every caller in it from the fallback, one failure each, as separate calls would have.
//! A caller that has gone before its batch is sent (dropped future) is left out of it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind};
use tokio::sync::{mpsc, oneshot};

use super::conn::Conn;
use super::{invocation, BucketRef, CounterRef, Gcra, LOGICAL_MIN_TTL_MS};

/// The most requests in one script call: bounds the script's run (Redis serves nothing else
/// meanwhile; 256 requests of three buckets take it about a millisecond) and its arguments.
pub(crate) const MAX_BATCH: usize = 256;

/// Why a request's call did not answer, kept apart from [`RedisError`] (which is not
/// `Clone`) so that every caller of a batch can be told.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    /// The connection itself was lost (refused, reset, closed): the backend goes down at
    /// once (see `health.rs`).
    pub(super) lost: bool,
    /// What happened, for the log.
    pub(super) message: String,
}

impl From<&RedisError> for Failure {
    fn from(error: &RedisError) -> Failure {
        Failure {
            lost: error.is_io_error()
                || error.is_connection_dropped()
                || error.is_connection_refusal(),
            message: error.to_string(),
        }
    }
}

/// The raw script reply of one request (as `gcra.lua` answers it), or why there is none.
pub(super) type Reply = Result<Vec<i64>, Failure>;

/// One request's script call, owned, so it can wait in the queue.
struct Request {
    buckets: Vec<(String, Gcra)>,
    counter: Option<(String, u64, Duration)>,
    now: Option<Duration>,
    reply: oneshot::Sender<Reply>,
}

impl Request {
    /// The request's buckets as the single-call encoder takes them.
    fn bucket_refs(&self) -> Vec<BucketRef<'_>> {
        self.buckets
            .iter()
            .map(|(key, gcra)| BucketRef { key, gcra: *gcra })
            .collect()
    }

    fn counter_ref(&self) -> Option<CounterRef<'_>> {
        self.counter
            .as_ref()
            .map(|(key, limit, expire_at)| CounterRef {
                key,
                limit: *limit,
                expire_at: *expire_at,
            })
    }
}

/// The handle the backend keeps: queues requests for the batching task.
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Request>,
    /// Read by tests only: they check that calls were really batched.
    #[cfg_attr(not(test), allow(dead_code))]
    stats: Arc<Stats>,
}

/// Script calls made and the largest batch, for tests and the module's claims.
#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    largest: AtomicUsize,
}

/// What the batching task needs to make calls; the backend's `Inner` is not shared with
/// it, so that dropping the last backend closes the queue and ends the task.
struct Calls {
    conn: Conn,
    single: Script,
    batch: Script,
    timeout: Duration,
    stats: Arc<Stats>,
}

impl Batcher {
    /// Spawns the batching task for `conn` (must run inside a Tokio runtime). `single` is
    /// `gcra.lua`; `timeout` bounds a call's life in the task (every caller bounds its own
    /// wait too).
    pub(super) fn spawn(conn: Conn, single: Script, timeout: Duration) -> Self {
        // Unbounded: every queued request belongs to a caller that waits for it under its
        // own deadline, so the queue holds at most the requests in flight, which the
        // server bounds; a bounded queue would only add a second wait.
        let (queue, requests) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let calls = Arc::new(Calls {
            conn,
            single,
            batch: Script::new(GCRA_BATCH_LUA),
            timeout,
            stats: Arc::clone(&stats),
        });
        tokio::spawn(run(requests, calls));
        Batcher { queue, stats }
    }

    /// Queues the call of `buckets` (and `counter`) at `now`; its reply comes on the
    /// returned receiver, which is closed without one when the call was given up.
    pub(super) fn submit(
        &self,
        buckets: &[BucketRef<'_>],
        counter: Option<CounterRef<'_>>,
        now: Option<Duration>,
    ) -> oneshot::Receiver<Reply> {
        let (reply, receiver) = oneshot::channel();
        let request = Request {
            buckets: buckets.iter().map(|b| (b.key.to_owned(), b.gcra)).collect(),
            counter: counter.map(|c| (c.key.to_owned(), c.limit, c.expire_at)),
            now,
            reply,
        };
        // The task ends only when this sender is dropped; if it has panicked, the request
        // is dropped here and the caller sees a closed receiver: a failed call.
        let _ = self.queue.send(request);
        receiver
    }

    /// Script calls made so far.
    #[cfg(test)]
    pub(super) fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::Relaxed)
    }

    /// The most requests one call carried so far.
    #[cfg(test)]
    pub(super) fn largest(&self) -> usize {
        self.stats.largest.load(Ordering::Relaxed)
    }
}

/// The batch script (see its header).
const GCRA_BATCH_LUA: &str = include_str!("gcra_batch.lua");

/// The call of `gcra_batch.lua` over `batch`, by `command` (`EVALSHA` with the script's
/// hash, or `EVAL` with its text). Built straight into one [`Cmd`] buffer: a script
/// invocation would allocate every key and argument apart, a dozen per request.
fn batch_call(command: &str, script: &str, batch: &[Request]) -> Cmd {
    let keys: usize = batch
        .iter()
        .map(|r| r.buckets.len() + usize::from(r.counter.is_some()))
        .sum();
    let mut call = ::redis::cmd(command);
    call.arg(script).arg(keys);
    for request in batch {
        for (key, _) in &request.buckets {
            call.arg(key);
        }
        if let Some((key, _, _)) = &request.counter {
            call.arg(key);
        }
    }
    for request in batch {
        match request.now {
            Some(now) => call.arg(now.as_nanos().to_string()).arg(LOGICAL_MIN_TTL_MS),
            None => call.arg("").arg(0u64),
        };
        call.arg(request.buckets.len())
            .arg(u8::from(request.counter.is_some()));
        for (_, gcra) in &request.buckets {
            call.arg(gcra.period).arg(gcra.tau);
        }
        if let Some((_, limit, expire_at)) = &request.counter {
            call.arg(*limit).arg(expire_at.as_millis() as u64).arg(1u64);
        }
    }
    call
}

/// The batching task: forms batches from the queue until every sender is gone.
async fn run(mut requests: mpsc::UnboundedReceiver<Request>, calls: Arc<Calls>) {
    while let Some(first) = requests.recv().await {
        // One yield: the tasks that are ready in this tick run, and queue their requests,
        // before the batch is cut. Without it the task, woken by the first request, would
        // usually run next and send batches of one.
        tokio::task::yield_now().await;
        let mut batch = Vec::with_capacity(MAX_BATCH.min(requests.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // A caller that has gone would spend tokens for nothing.
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        // Not awaited: the next batch forms while this one is in flight.
        tokio::spawn(Arc::clone(&calls).send(batch));
    }
}

impl Calls {
    /// Makes one script call for `batch` and answers each of its callers.
    async fn send(self: Arc<Self>, mut batch: Vec<Request>) {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.largest.fetch_max(batch.len(), Ordering::Relaxed);
        let mut conn = self.conn.clone();
        if batch.len() == 1 {
            // Alone: today's call, so a quiet replica's requests cost what they always did.
            let request = batch.pop().expect("the batch holds one request");
            let (buckets, counter) = (request.bucket_refs(), request.counter_ref());
            let call = invocation(&self.single, &buckets, counter, request.now);
            let reply =
                tokio::time::timeout(self.timeout, call.invoke_async::<Vec<i64>>(&mut conn)).await;
            // A missed deadline drops the sender: the caller has given up by now.
            if let Ok(reply) = reply {
                let _ = request.reply.send(reply.map_err(|e| Failure::from(&e)));
            }
            return;
        }
        let call = batch_call("EVALSHA", self.batch.get_hash(), &batch);
        let reply = tokio::time::timeout(self.timeout, async {
            match call.query_async::<Vec<Vec<i64>>>(&mut conn).await {
                // Not loaded yet (first use, or a restarted Redis): EVAL loads it.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    batch_call("EVAL", GCRA_BATCH_LUA, &batch)
                        .query_async(&mut conn)
                        .await
                }
                reply => reply,
            }
        })
        .await;
        match reply {
            Ok(Ok(replies)) if replies.len() == batch.len() => {
                for (request, reply) in batch.into_iter().zip(replies) {
                    let _ = request.reply.send(Ok(reply));
                }
            }
            Ok(Ok(replies)) => {
                let failure = Failure {
                    lost: false,
                    message: format!(
                        "unexpected batch reply: {} answers for {} requests",
                        replies.len(),
                        batch.len()
                    ),
                };
                for request in batch {
                    let _ = request.reply.send(Err(failure.clone()));
                }
            }
            Ok(Err(error)) => {
                let failure = Failure::from(&error);
                for request in batch {
                    let _ = request.reply.send(Err(failure.clone()));
                }
            }
            // A missed deadline drops the senders: every caller has given up by now.
            Err(_elapsed) => {}
        }
    }
}
