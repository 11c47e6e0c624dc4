//! The event loop's executor: every task runs on the one thread that made
//! it, so its run queue is a plain `VecDeque`.
//!
//! async-executor's `LocalExecutor` is its multi-threaded executor behind
//! a `!Send` face: every wake-up went through a lock-free queue and a
//! notification, and the runner stole batches back from it. On a room's
//! fan-out that was about 60 instructions per delivery, as much as queueing
//! the frame. Here a wake-up on the loop's thread is a push on its queue;
//! only a wake-up from another thread (the blocking pool finishing a job)
//! takes the mutex beside it.
//!
//! Dropping the executor drops every task it still has, as async-executor
//! did: a task's destructors (a store handle, a socket) run before the
//! daemon exits.

use async_task::{Runnable, Task};
use slab::Slab;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// Tasks run before the loop lets the reactor look for I/O (a task that
/// is always ready cannot keep the sockets waiting); async-executor's
/// figure.
const TURN: usize = 200;
/// Run-queue places kept while the loop sleeps.
const QUEUE_KEPT: usize = 256;

pub struct Executor {
    shared: Arc<Shared>,
    /// The wakers of the tasks not yet finished, to cancel them on drop.
    active: Rc<RefCell<Slab<Waker>>>,
}

/// What a task's wake-up reaches (on any thread).
struct Shared {
    /// Which of this thread's queues is the executor's.
    id: usize,
    remote: Mutex<Vec<Runnable>>,
    /// Whether `remote` has something: the loop looks without the lock.
    remote_due: AtomicBool,
    /// The loop's waker (async-io's `block_on`), for when it sleeps.
    loop_waker: Mutex<Option<Waker>>,
}

/// This thread's executors' queues (almost always one).
struct Local {
    id: usize,
    queue: VecDeque<Runnable>,
    /// The loop has nothing to run and waits to be woken.
    sleeping: Option<Waker>,
}

thread_local! {
    static LOCAL: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

impl Default for Executor {
    fn default() -> Self {
        Self::new()
    }
}

impl Executor {
    pub fn new() -> Executor {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        LOCAL.with_borrow_mut(|l| {
            l.push(Local {
                id,
                queue: VecDeque::new(),
                sleeping: None,
            })
        });
        Executor {
            shared: Arc::new(Shared {
                id,
                remote: Mutex::new(Vec::new()),
                remote_due: AtomicBool::new(false),
                loop_waker: Mutex::new(None),
            }),
            active: Rc::new(RefCell::new(Slab::new())),
        }
    }

    /// Starts `future` as a task of this executor; it runs while
    /// [`Executor::run`] does.
    pub fn spawn<T: 'static>(&self, future: impl Future<Output = T> + 'static) -> Task<T> {
        let slot = self.active.borrow_mut().vacant_entry().key();
        // The task leaves the active set when it ends or is dropped. Not
        // an `async move` block around the future: that would keep the
        // future twice in the task's state (as the block's capture and as
        // the awaited value), and a connection's task is its memory.
        let future = Tracked {
            future,
            _leave: Leave(self.active.clone(), slot),
        };
        // The schedule function is in every task's allocation: one pointer.
        let shared = self.shared.clone();
        let (runnable, task) =
            async_task::spawn_local(future, move |r: Runnable| schedule(&shared, r));
        self.active.borrow_mut().insert(runnable.waker());
        runnable.schedule();
        task
    }

    /// Runs the tasks until `future` completes.
    pub async fn run<T>(&self, future: impl Future<Output = T>) -> T {
        let tasks = std::future::poll_fn(|cx| {
            let waker = cx.waker();
            {
                let mut kept = self
                    .shared
                    .loop_waker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if !kept.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *kept = Some(waker.clone());
                }
            }
            with_local(self.shared.id, |l| l.sleeping = None);
            for _ in 0..TURN {
                // Wake-ups from other threads join the queue as they come,
                // in their turn with the loop's own.
                if self.shared.remote_due.load(Ordering::Relaxed) {
                    self.take_remote();
                }
                let next = with_local(self.shared.id, |l| match l.queue.pop_front() {
                    Some(r) => Some(r),
                    None => {
                        // A burst (every connection woken at once) does not
                        // keep its queue's memory.
                        if l.queue.capacity() > QUEUE_KEPT {
                            l.queue.shrink_to(QUEUE_KEPT);
                        }
                        l.sleeping = Some(waker.clone());
                        None
                    }
                });
                match next.flatten() {
                    Some(r) => {
                        r.run();
                    }
                    // A wake-up from another thread after the look above
                    // finds the loop's waker, kept at the top.
                    None => return Poll::<T>::Pending,
                }
            }
            waker.wake_by_ref();
            Poll::Pending
        });
        futures_lite::future::or(future, tasks).await
    }

    /// Moves the wake-ups from other threads to the back of the queue.
    fn take_remote(&self) {
        if self.shared.remote_due.swap(false, Ordering::Acquire) {
            let woken: Vec<Runnable> =
                std::mem::take(&mut *self.shared.remote.lock().unwrap_or_else(|p| p.into_inner()));
            with_local(self.shared.id, |l| l.queue.extend(woken));
        }
    }
}

/// Runs `f` on this thread's queue of executor `id`, if it is here.
fn with_local<R>(id: usize, f: impl FnOnce(&mut Local) -> R) -> Option<R> {
    LOCAL
        .try_with(|l| l.borrow_mut().iter_mut().find(|l| l.id == id).map(f))
        .ok()
        .flatten()
}

fn schedule(shared: &Shared, r: Runnable) {
    // On the loop's thread: its queue, and a wake-up for the loop only if
    // it sleeps (the waker is called after the queue is let go).
    let mut r = Some(r);
    let woke = with_local(shared.id, |l| {
        if let Some(r) = r.take() {
            l.queue.push_back(r);
        }
        l.sleeping.take()
    });
    if let Some(waker) = woke.flatten() {
        waker.wake();
    }
    let Some(r) = r else { return };
    // From another thread (or while this one is being torn down).
    shared
        .remote
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(r);
    shared.remote_due.store(true, Ordering::Release);
    let waker = shared
        .loop_waker
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(w) = waker {
        w.wake();
    }
}

pin_project_lite::pin_project! {
    /// A task's future, and its place in the active set.
    struct Tracked<F> {
        #[pin]
        future: F,
        _leave: Leave,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        self.project().future.poll(cx)
    }
}

/// Takes a finished (or dropped) task out of the active set.
struct Leave(Rc<RefCell<Slab<Waker>>>, usize);

impl Drop for Leave {
    fn drop(&mut self) {
        if let Ok(mut active) = self.0.try_borrow_mut() {
            active.try_remove(self.1);
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Waking every unfinished task puts it in the queue; dropping the
        // queue's runnables then drops their futures, which may wake
        // others: the queue is emptied until it stays empty, and always
        // outside its borrow.
        let wakers: Vec<Waker> = self.active.borrow_mut().drain().collect();
        for w in wakers {
            w.wake();
        }
        loop {
            let queue =
                with_local(self.shared.id, |l| std::mem::take(&mut l.queue)).unwrap_or_default();
            let remote =
                std::mem::take(&mut *self.shared.remote.lock().unwrap_or_else(|p| p.into_inner()));
            if queue.is_empty() && remote.is_empty() {
                break;
            }
            drop(queue);
            drop(remote);
        }
        let gone = LOCAL.try_with(|l| {
            let mut l = l.borrow_mut();
            let at = l.iter().position(|l| l.id == self.shared.id)?;
            Some(l.swap_remove(at))
        });
        drop(gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn tasks_run_in_the_order_they_were_woken() {
        let ex = Executor::new();
        let seen = Rc::new(RefCell::new(Vec::new()));
        for i in 0..3 {
            let seen = seen.clone();
            ex.spawn(async move { seen.borrow_mut().push(i) }).detach();
        }
        let out = async_io::block_on(ex.run(async { ex.spawn(async { 7 }).await }));
        assert_eq!(out, 7);
        assert_eq!(*seen.borrow(), [0, 1, 2]);
    }

    #[test]
    fn a_wake_up_from_another_thread_reaches_the_loop() {
        let ex = Executor::new();
        let (tx, rx) = async_channel::bounded::<u32>(1);
        let got = async_io::block_on(ex.run(async {
            let task = ex.spawn(async move { rx.recv().await.unwrap_or(0) });
            std::thread::spawn(move || tx.send_blocking(5));
            task.await
        }));
        assert_eq!(got, 5);
    }

    #[test]
    fn a_busy_task_does_not_keep_the_others_waiting() {
        let ex = Executor::new();
        let ticks = Rc::new(Cell::new(0u32));
        let t = ticks.clone();
        ex.spawn(async move {
            loop {
                t.set(t.get() + 1);
                futures_lite::future::yield_now().await;
            }
        })
        .detach();
        let timer = async_io::block_on(ex.run(async {
            async_io::Timer::after(std::time::Duration::from_millis(5)).await;
            true
        }));
        assert!(timer && ticks.get() > 0);
    }

    #[test]
    fn dropping_the_executor_drops_its_unfinished_tasks() {
        struct Flag(Rc<Cell<bool>>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = Rc::new(Cell::new(false));
        let ex = Executor::new();
        let flag = Flag(dropped.clone());
        ex.spawn(async move {
            let _flag = flag;
            futures_lite::future::pending::<()>().await
        })
        .detach();
        async_io::block_on(ex.run(futures_lite::future::yield_now()));
        assert!(!dropped.get());
        drop(ex);
        assert!(dropped.get());
    }
}
