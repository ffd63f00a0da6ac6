//! One slot's queue: the jobs waiting for it in the queen's order, and the one it runs (what
//! cancels reach it through).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::requests::{Requests, Ticket};
use super::worker::{Lease, Worker};
use super::{POLL, QueuedJob};
use crate::{Error, Event};

/// The job a slot runs, as seen by cancels.
#[derive(Debug)]
struct Running {
    session: u64,
    handle: u64,
    model: String,
    ticket: Arc<Ticket>,
}

#[derive(Debug, Default)]
struct SlotState {
    queue: VecDeque<QueuedJob>,
    running: Option<Running>,
    closed: bool,
}

/// One slot's queue, shared by the sessions (producers, cancels) and the slot's thread.
#[derive(Debug, Default)]
pub(super) struct Slot {
    state: Mutex<SlotState>,
    wake: Condvar,
}

/// What the slot thread gets from its queue.
#[derive(Debug)]
pub(super) enum Next<W = Lease> {
    /// The head job, now recorded as running on the worker leased for it.
    Job(QueuedJob, Arc<Ticket>, W),
    /// The head job, past its deadline before a worker took it.
    Expired(QueuedJob),
    /// Nothing arrived within the wait, or the head job's model is not ready yet.
    Idle,
    Closed,
}

/// What `Slot::cancel` found.
#[derive(Debug)]
pub(super) enum Cancelled {
    Queued(QueuedJob),
    /// Running: cancel it through this once the queue is unlocked.
    Running(Arc<Ticket>),
}

// === impl Slot ===

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic elsewhere must not take the queue down with it: the state stays consistent
        // (every mutation is a single push/pop/assignment).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` behind every waiting job with an `order` no larger than its own (so equal
    /// keys keep arrival order); refused once the slot holds `limit` jobs (running one
    /// included).
    pub(super) fn push(&self, slot: u32, job: QueuedJob, limit: usize) -> Result<(), Error> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::ShuttingDown);
        }
        let same = |s: u64, h: u64| s == job.session && h == job.handle;
        if st.queue.iter().any(|q| same(q.session, q.handle))
            || st
                .running
                .as_ref()
                .is_some_and(|r| same(r.session, r.handle))
        {
            return Err(Error::DuplicateHandle(job.handle));
        }
        if st.queue.len() + usize::from(st.running.is_some()) >= limit {
            return Err(Error::SlotFull { slot, limit });
        }
        let at = st.queue.partition_point(|q| q.order <= job.order);
        st.queue.insert(at, job);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Finds one job: a queued one is removed and returned (to be answered CANCELLED), a
    /// running one's ticket is returned (to be cancelled). None if the slot has no such job.
    pub(super) fn cancel(&self, session: u64, handle: u64) -> Option<Cancelled> {
        let mut st = self.lock();
        if let Some(i) = st
            .queue
            .iter()
            .position(|q| q.session == session && q.handle == handle)
        {
            return st.queue.remove(i).map(Cancelled::Queued);
        }
        match &st.running {
            Some(r) if r.session == session && r.handle == handle => {
                Some(Cancelled::Running(Arc::clone(&r.ticket)))
            }
            _ => None,
        }
    }

    /// Drops every queued job of `session` (nobody is left to tell). Returns how many jobs it
    /// had here, and the running one's ticket if it is the session's.
    pub(super) fn cancel_session(&self, session: u64) -> (usize, Option<Arc<Ticket>>) {
        let mut st = self.lock();
        let before = st.queue.len();
        st.queue.retain(|q| q.session != session);
        let mut n = before - st.queue.len();
        let running = st
            .running
            .as_ref()
            .filter(|r| r.session == session)
            .map(|r| Arc::clone(&r.ticket));
        n += usize::from(running.is_some());
        (n, running)
    }

    /// Takes every queued job out (worker lost, shutting down).
    pub(super) fn drain(&self) -> Vec<QueuedJob> {
        self.lock().queue.drain(..).collect()
    }

    /// Waits up to `wait` for a job whose model has a ready worker for this slot (`take`
    /// leases it); the job returned is recorded as running with a fresh ticket, so a cancel can
    /// reach it from now on. Only the head job is considered: the queen predicted this order,
    /// loads included.
    pub(super) fn next<W: Claim>(
        &self,
        wait: Duration,
        take: impl FnOnce(&str) -> Option<W>,
    ) -> Next<W> {
        let mut st = self.lock();
        if st.queue.is_empty() && !st.closed {
            st = self
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.closed {
            return Next::Closed;
        }
        let Some(head) = st.queue.front() else {
            return Next::Idle;
        };
        if head.deadline.is_expired() {
            let job = st.queue.pop_front().expect("head present");
            return Next::Expired(job);
        }
        let Some(worker) = take(&head.model) else {
            // Its model is still loading: look again after a short wait.
            drop(st);
            std::thread::sleep(POLL);
            return Next::Idle;
        };
        let job = st.queue.pop_front().expect("head present");
        let ticket = Arc::new(Ticket::new(worker.requests()));
        st.running = Some(Running {
            session: job.session,
            handle: job.handle,
            model: job.model.clone(),
            ticket: Arc::clone(&ticket),
        });
        Next::Job(job, ticket, worker)
    }

    /// Models of the jobs running or queued here.
    pub(super) fn models_in_use(&self, into: &mut HashSet<String>) {
        let st = self.lock();
        into.extend(st.queue.iter().map(|q| q.model.clone()));
        if let Some(r) = &st.running {
            into.insert(r.model.clone());
        }
    }

    /// Takes out the queued jobs of `model` (its load failed).
    pub(super) fn drain_model(&self, model: &str) -> Vec<QueuedJob> {
        let mut st = self.lock();
        let (gone, kept): (VecDeque<_>, VecDeque<_>) =
            st.queue.drain(..).partition(|q| q.model == model);
        st.queue = kept;
        gone.into()
    }

    /// The running job is over: clear it *before* its terminal event leaves, so a queen that
    /// sends the next frame on seeing that event never finds the slot still full.
    pub(super) fn finish(&self, job: &QueuedJob, terminal: Event) {
        self.lock().running = None;
        job.send(terminal);
    }

    /// Jobs queued or running: 0 means the slot is idle.
    pub(super) fn load(&self) -> usize {
        let st = self.lock();
        st.queue.len() + usize::from(st.running.is_some())
    }

    /// Refuses jobs from now on; returns the running job's ticket, to be cancelled.
    pub(super) fn close(&self) -> Option<Arc<Ticket>> {
        let mut st = self.lock();
        st.closed = true;
        let running = st.running.as_ref().map(|r| Arc::clone(&r.ticket));
        drop(st);
        self.wake.notify_all();
        running
    }

    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// A worker a job is about to run on: the requests its ticket cancels through.
pub(super) trait Claim {
    fn requests(&self) -> Arc<Requests>;
}

impl Claim for Lease {
    fn requests(&self) -> Arc<Requests> {
        Arc::clone(Worker::requests(self))
    }
}
