//! The bounded queue between the HTTP handlers and the worker threads, with batching and cancellation.
//!
//! - A handler [`Scheduler::submit`]s a checked [`Request`] and gets a [`Ticket`] and a receiver for the
//!   result; a full queue is refused at once.
//! - Each worker thread owns one [`Pipeline`] and loops on [`Scheduler::next_batch`]: the oldest waiting
//!   request plus the compatible ones behind it (same size, steps and guidance), up to `max_batch` images.
//! - Dropping a [`Ticket`] (the client went away, or timed out) removes a queued request; for a running one
//!   it cancels the run once no client of that run is left, so the other clients of a batch are not harmed.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::pipeline::{Output, Pipeline, Quiet, Request};
use crate::runtime::Canceller;
use crate::{Error, Result};

/// What a worker sends back for one request.
#[derive(Debug)]
pub struct JobResult {
    pub result: Result<Output>,
    /// Time from submission to the start of its run.
    pub queue_wait: Duration,
    /// Requests and images in the run it was part of.
    pub batch_requests: usize,
    pub batch_images: usize,
}

struct Job {
    id: u64,
    request: Request,
    enqueued: Instant,
    reply: oneshot::Sender<JobResult>,
}

struct Batch {
    cancel: Canceller,
    /// Clients of the run still waiting for their answer.
    live: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// job id -> the run it is part of.
    running: HashMap<u64, u64>,
    batches: HashMap<u64, Batch>,
    /// No new requests; workers exit once the queue is empty.
    closing: bool,
    next_id: u64,
    /// Smoothed run time in seconds, for Retry-After.
    avg_run: f64,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full; retry after this many seconds.
    Full { retry_after: u64 },
    /// The server is shutting down.
    Closing,
}

pub struct Scheduler {
    state: Mutex<State>,
    work: Condvar,
    max_queue: usize,
    max_batch: usize,
    workers: usize,
    metrics: Arc<Metrics>,
}

/// A queued or running request. Dropping it before the answer arrived abandons the request.
pub struct Ticket {
    sched: Arc<Scheduler>,
    id: u64,
    /// Set by the handler when it gives up after the request timeout (not counted as a disconnect).
    pub timed_out: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.sched.abandon(self.id, self.timed_out);
    }
}

/// One run for a worker: the jobs, and the canceller that stops it.
pub struct Run {
    id: u64,
    jobs: Vec<Job>,
    cancel: Canceller,
}

impl Scheduler {
    pub fn new(max_queue: usize, max_batch: usize, workers: usize, metrics: Arc<Metrics>) -> Self {
        Scheduler {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            max_queue,
            max_batch: max_batch.max(1),
            workers: workers.max(1),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `request`, or refuses it at once when the queue holds `max_queue` requests.
    pub fn submit(
        self: &Arc<Self>,
        request: Request,
    ) -> std::result::Result<(Ticket, oneshot::Receiver<JobResult>), Refused> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.closing {
            return Err(Refused::Closing);
        }
        if st.queue.len() >= self.max_queue {
            // Time for the queue ahead to drain, roughly: runs of max_batch across the workers.
            let runs_ahead = st.queue.len().div_ceil(self.max_batch * self.workers) as f64;
            let secs = (st.avg_run.max(0.05) * runs_ahead).ceil().max(1.0);
            return Err(Refused::Full {
                retry_after: secs as u64,
            });
        }
        st.next_id += 1;
        let id = st.next_id;
        st.queue.push_back(Job {
            id,
            request,
            enqueued: Instant::now(),
            reply: tx,
        });
        drop(st);
        self.work.notify_one();
        Ok((
            Ticket {
                sched: self.clone(),
                id,
                timed_out: false,
            },
            rx,
        ))
    }

    /// The client of job `id` is gone (or its answer arrived: then this finds nothing to do).
    fn abandon(&self, id: u64, timed_out: bool) {
        let mut st = self.lock();
        if let Some(pos) = st.queue.iter().position(|j| j.id == id) {
            st.queue.remove(pos);
            drop(st);
            if !timed_out {
                self.metrics.disconnect("queued");
            }
            return;
        }
        let Some(run) = st.running.remove(&id) else {
            return;
        };
        if !timed_out {
            self.metrics.disconnect("running");
        }
        if let Some(b) = st.batches.get_mut(&run) {
            b.live = b.live.saturating_sub(1);
            if b.live == 0 {
                // Nobody is waiting for this run any more: stop it between kernels.
                b.cancel.cancel();
            }
        }
    }

    /// Blocks until there is work: the oldest request and the compatible ones queued behind it, up to
    /// `max_batch` images (a request is never split, so one larger than that runs alone). `None` once the
    /// server is closing and the queue is empty.
    pub fn next_batch(&self) -> Option<Run> {
        let mut st = self.lock();
        loop {
            if let Some(first) = st.queue.pop_front() {
                let mut images = first.request.num_images;
                let mut jobs = vec![first];
                let mut i = 0;
                while i < st.queue.len() && images < self.max_batch {
                    let j = &st.queue[i];
                    if j.request.batches_with(&jobs[0].request)
                        && images + j.request.num_images <= self.max_batch
                    {
                        images += j.request.num_images;
                        let job = st.queue.remove(i).expect("index is in the queue");
                        jobs.push(job);
                    } else {
                        i += 1;
                    }
                }
                st.next_id += 1;
                let run = st.next_id;
                let cancel = Canceller::new();
                for j in &jobs {
                    st.running.insert(j.id, run);
                }
                st.batches.insert(
                    run,
                    Batch {
                        cancel: cancel.clone(),
                        live: jobs.len(),
                    },
                );
                return Some(Run {
                    id: run,
                    jobs,
                    cancel,
                });
            }
            if st.closing {
                return None;
            }
            st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs `run` on `pipe` and answers its clients. A panic in the pipeline is caught and answered as an
    /// error, so the worker lives on.
    pub fn execute(&self, pipe: &mut Pipeline, run: Run) {
        let started = Instant::now();
        let requests: Vec<Request> = run.jobs.iter().map(|j| j.request.clone()).collect();
        let images: usize = requests.iter().map(|r| r.num_images).sum();
        self.metrics.batch(requests.len(), images);
        for j in &run.jobs {
            self.metrics.queue_wait(started - j.enqueued);
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            pipe.generate_batch(&requests, &mut Quiet, &run.cancel, false)
        }));
        let elapsed = started.elapsed().as_secs_f64();
        {
            let mut st = self.lock();
            for j in &run.jobs {
                st.running.remove(&j.id);
            }
            st.batches.remove(&run.id);
            st.avg_run = if st.avg_run == 0.0 {
                elapsed
            } else {
                0.8 * st.avg_run + 0.2 * elapsed
            };
        }
        let n = run.jobs.len();
        let mut answers: Vec<Result<Output>> = match result {
            Ok(Ok(outs)) => {
                self.metrics.run("ok", images);
                if let Some(o) = outs.first() {
                    let t = &o.timings;
                    self.metrics.stage("tokenize", t.tokenize);
                    self.metrics.stage("clip", t.clip);
                    self.metrics.stage("t5", t.t5);
                    self.metrics.stage("denoise", t.denoise.iter().sum());
                    self.metrics.stage("vae_decode", t.vae_decode);
                    self.metrics.stage("to_rgb", t.to_rgb);
                    self.metrics.stage("generate", t.total);
                }
                outs.into_iter().map(Ok).collect()
            }
            Ok(Err(e)) => {
                let outcome = if e.kind == crate::ErrorKind::Cancelled {
                    "cancelled"
                } else {
                    "error"
                };
                self.metrics.run(outcome, 0);
                if e.kind != crate::ErrorKind::Cancelled {
                    eprintln!("fluxrt serve: run of {n} request(s) failed: {e}");
                }
                (0..n)
                    .map(|_| {
                        Err(Error {
                            kind: e.kind,
                            message: e.message.clone(),
                            hint: e.hint.clone(),
                        })
                    })
                    .collect()
            }
            Err(_) => {
                self.metrics.run("error", 0);
                eprintln!("fluxrt serve: a run of {n} request(s) panicked");
                (0..n)
                    .map(|_| Err(Error::runtime("the run panicked")))
                    .collect()
            }
        };
        for (job, answer) in run.jobs.into_iter().zip(answers.drain(..)) {
            let queue_wait = started - job.enqueued;
            // A client that left has dropped its receiver; nothing to do then.
            let _ = job.reply.send(JobResult {
                result: answer,
                queue_wait,
                batch_requests: n,
                batch_images: images,
            });
        }
    }

    /// Stops taking requests; workers finish the queue and then exit.
    pub fn close(&self) {
        self.lock().closing = true;
        self.work.notify_all();
    }

    /// After the shutdown deadline: drops every queued request (their clients get 503) and cancels every run.
    pub fn abort_all(&self) {
        let mut st = self.lock();
        st.closing = true;
        st.queue.clear();
        for b in st.batches.values() {
            b.cancel.cancel();
        }
        drop(st);
        self.work.notify_all();
    }

    pub fn queue_depth(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn running_requests(&self) -> usize {
        self.lock().running.len()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
