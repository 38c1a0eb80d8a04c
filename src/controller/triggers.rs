//! Triggers: which rollouts to reconcile, and how often.
//!
//! Every watch event is mapped to the rollouts it concerns and broadcast; the leader's controller
//! reads them through [`throttle`]. kube-runtime's own debounce is not used: it restarts its timer on
//! every request, so a rollout triggered more often than the debounce period (a fleet's progress
//! reports, a storm of ModelDeployment updates) is postponed for as long as the triggers keep
//! coming — and with it the retry its last error asked for.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::Controller;
use kube::runtime::controller::{Action, Error as ControllerError};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use crate::api::ModelRollout;

/// Each rollout is reconciled at most once per this interval for its triggers (retries and resyncs aside).
pub const TRIGGER_INTERVAL: Duration = Duration::from_millis(200);

/// How often every rollout is reconciled without a trigger: a safety net.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);

/// Reconciles running at once; further ones wait for a turn in arrival order.
pub const RECONCILE_CONCURRENCY: usize = 8;

/// Runs the leader's reconciles of the rollouts in `store`, fed by `triggers`, until `stop`.
///
/// Every rollout is reconciled once at start — so a new leader, or one that lost the lease and got
/// it back, reconciles every rollout whatever retries the previous term had scheduled — then
/// every [`RESYNC_INTERVAL`]. Two defaults of kube-runtime's Controller would lose reconciles:
/// - its debounce restarts on every request, so a rollout triggered more often than the debounce
///   period would not reconcile — nor run the retry its error asked for — until the triggers stop.
///   There is none here; [`throttle`] bounds the rate instead, and a trigger can only bring a
///   scheduled retry forward, never push it back;
/// - its concurrency limit picks the next of the waiting rollouts from a hash set, so when more
///   rollouts are due than slots free up, the same ones win again and again and others starve. The
///   Controller runs unlimited here (still one reconcile per rollout at a time) and each reconcile
///   waits for one of [`RECONCILE_CONCURRENCY`] permits of a FIFO semaphore: first due, first run.
pub fn run_rollout_controller<Ctx, E, Fut>(
    store: Store<ModelRollout>,
    triggers: impl Stream<Item = ObjectRef<ModelRollout>> + Send + 'static,
    stop: CancellationToken,
    reconcile: impl Fn(Arc<ModelRollout>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
    error_policy: impl Fn(Arc<ModelRollout>, &E, Arc<Ctx>) -> Action + Send + Sync + 'static,
    ctx: Arc<Ctx>,
) -> impl Stream<Item = Result<(ObjectRef<ModelRollout>, Action), ControllerError<E, watcher::Error>>>
where
    Ctx: Send + Sync + 'static,
    E: std::error::Error + Send + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    let resync = futures::stream::once(async {}).chain(
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
            Instant::now() + RESYNC_INTERVAL,
            RESYNC_INTERVAL,
        ))
        .map(|_| ()),
    );
    let permits = Arc::new(Semaphore::new(RECONCILE_CONCURRENCY));
    let reconcile = Arc::new(reconcile);
    let latest = store.clone();
    Controller::for_stream(futures::stream::pending::<Result<ModelRollout, watcher::Error>>(), store)
        .reconcile_on(throttle(triggers, TRIGGER_INTERVAL))
        .reconcile_all_on(resync)
        .with_config(kube::runtime::controller::Config::default().concurrency(0))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            move |rollout, ctx| {
                let (permits, reconcile, latest) = (permits.clone(), reconcile.clone(), latest.clone());
                async move {
                    let _turn = permits.acquire_owned().await.expect("the semaphore is never closed");
                    // The wait can be long: reconcile the rollout as the cache has it now.
                    match latest.get(&ObjectRef::from_obj(&*rollout)) {
                        Some(now) => reconcile(now, ctx).await,
                        None => Ok(Action::await_change()), // deleted meanwhile
                    }
                }
            },
            error_policy,
            ctx,
        )
}

/// Lets each item through at most once per `interval`: the first trigger at once, a trigger inside
/// the interval at its end. A trigger is never dropped and never delayed by a later one, so every
/// burst ends in exactly one emission no later than `interval` after its first trigger.
pub fn throttle<T, S>(input: S, interval: Duration) -> impl Stream<Item = T>
where
    T: Clone + Eq + Hash,
    S: Stream<Item = T>,
{
    struct State<T, S> {
        input: std::pin::Pin<Box<futures::stream::Fuse<S>>>,
        /// When each item was last let through (pruned once older than `interval`).
        last: HashMap<T, Instant>,
        /// Items waiting for their interval to end.
        due: DelayQueue<T>,
        waiting: HashSet<T>,
    }
    let state: State<T, S> =
        State { input: Box::pin(input.fuse()), last: HashMap::new(), due: DelayQueue::new(), waiting: HashSet::new() };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            let State { input, last, due, waiting } = &mut st;
            tokio::select! {
                biased;
                Some(expired) = futures::future::poll_fn(|cx| due.poll_expired(cx)), if !due.is_empty() => {
                    let item = expired.into_inner();
                    waiting.remove(&item);
                    last.insert(item.clone(), Instant::now());
                    return Some((item, st));
                }
                Some(item) = input.next(), if !input.is_done() => {
                    let now = Instant::now();
                    match last.get(&item) {
                        Some(&at) if now < at + interval => {
                            if waiting.insert(item.clone()) {
                                due.insert_at(item, at + interval);
                            }
                        }
                        _ => {
                            if last.len() > 4096 {
                                last.retain(|_, at| now < *at + interval);
                            }
                            last.insert(item.clone(), now);
                            return Some((item, st));
                        }
                    }
                }
                // The input ended and nothing is due.
                else => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    const I: Duration = Duration::from_millis(200);

    /// Collects what the throttle lets through, with the (paused) time it came out.
    fn spawn_throttle(rx: mpsc::UnboundedReceiver<&'static str>) -> mpsc::UnboundedReceiver<(&'static str, Instant)> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut s = std::pin::pin!(throttle(UnboundedReceiverStream::new(rx), I));
            while let Some(x) = s.next().await {
                let _ = out_tx.send((x, Instant::now()));
            }
        });
        out_rx
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_comes_out_once_at_once_and_once_at_the_end_of_the_interval() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = spawn_throttle(rx);
        let start = Instant::now();
        for _ in 0..100 {
            tx.send("a").unwrap();
        }
        let (x, at) = out.recv().await.unwrap();
        assert_eq!((x, at), ("a", start));
        let (x, at) = out.recv().await.unwrap();
        assert_eq!((x, at - start), ("a", I));
        drop(tx);
        assert!(out.recv().await.is_none(), "nothing more: the burst ended in one trailing emission");
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_faster_than_the_interval_never_starve_an_item() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = spawn_throttle(rx);
        let start = Instant::now();
        // A storm: "a" every 50 ms for 10 s. A debounce would postpone "a" until it stops.
        tokio::spawn(async move {
            for _ in 0..200 {
                tx.send("a").unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut times = vec![];
        while let Some((_, at)) = out.recv().await {
            times.push(at - start);
        }
        assert!(times.len() >= 45, "about one per interval over 10 s, got {}", times.len());
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= I, "at most once per interval: {pair:?}");
            assert!(pair[1] - pair[0] <= I + Duration::from_millis(50), "never postponed: {pair:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn items_do_not_hold_each_other_back_and_what_is_due_survives_the_end_of_input() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = spawn_throttle(rx);
        let start = Instant::now();
        for x in ["a", "b", "a", "c", "b"] {
            tx.send(x).unwrap();
        }
        drop(tx);
        let mut got = vec![];
        while let Some((x, at)) = out.recv().await {
            got.push((x, at - start));
        }
        got.sort();
        let zero = Duration::ZERO;
        assert_eq!(got, vec![("a", zero), ("a", I), ("b", zero), ("b", I), ("c", zero)]);
    }

    // The controller as the leader runs it, over real kube-runtime machinery: a store, triggers,
    // retries. Only the reconciler is a stand-in (it fails until told otherwise).

    use std::sync::Mutex;

    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn rollout(name: &str) -> ModelRollout {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "peat.dev/v1alpha1", "kind": "ModelRollout",
            "metadata": {"name": name, "namespace": "ns", "uid": name},
            "spec": {"model": "m", "version": "1.0.0", "source": {"repository": "r.example/m"}, "scope": {"all": {}}}
        }))
        .unwrap()
    }

    #[derive(Debug, thiserror::Error)]
    #[error("version not pushed yet")]
    struct NotYet;

    /// When each rollout was reconciled (paused time since the start).
    type Log = Arc<Mutex<Vec<(String, Duration)>>>;

    /// Runs the controller over `names` until `stop`; `fail(name)` says whether a reconcile fails
    /// (its retry is asked for `retry` later), `work` is how long one takes.
    fn run<F: Fn(&str) -> bool + Send + Sync + 'static>(
        names: &[&str],
        triggers: impl Stream<Item = ObjectRef<ModelRollout>> + Send + 'static,
        fail: F,
        work: Duration,
        retry: Duration,
        stop: CancellationToken,
    ) -> (Log, tokio::task::JoinHandle<()>) {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for n in names {
            writer.apply_watcher_event(&Event::InitApply(rollout(n)));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let log: Log = Arc::default();
        let start = Instant::now();
        let ctx = Arc::new((log.clone(), fail));
        let task = tokio::spawn(async move {
            let _writer = writer; // the store stays ready while the controller runs
            let reconcile = move |r: Arc<ModelRollout>, ctx: Arc<(Log, F)>| async move {
                let name = r.metadata.name.clone().unwrap();
                ctx.0.lock().unwrap().push((name.clone(), Instant::now() - start));
                tokio::time::sleep(work).await;
                if (ctx.1)(&name) { Err(NotYet) } else { Ok(Action::await_change()) }
            };
            run_rollout_controller(
                store,
                triggers,
                stop,
                reconcile,
                move |_, _: &NotYet, _| Action::requeue(retry),
                ctx,
            )
            .for_each(|_| async {})
            .await;
        });
        (log, task)
    }

    fn times(log: &Log, name: &str) -> Vec<Duration> {
        log.lock().unwrap().iter().filter(|(n, _)| n == name).map(|(_, t)| *t).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_rollout_triggered_faster_than_the_interval_still_reconciles_and_retries() {
        // A sibling's agents report every 50 ms: every report triggers every rollout of the model.
        let storm = futures::stream::iter(0..200)
            .then(|_| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ObjectRef::from_obj(&rollout("late"))
            })
            .boxed();
        let stop = CancellationToken::new();
        let (log, task) =
            run(&["late"], storm, |_| true, Duration::from_millis(5), Duration::from_secs(5), stop.clone());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = times(&log, "late");
        // Once at start, then at least once per interval while the storm lasts (debounced, it
        // would not run again until the storm ends).
        assert!(t.len() >= 40, "reconciled {} times in 10 s: {t:?}", t.len());
        for pair in t.windows(2) {
            assert!(pair[1] - pair[0] <= TRIGGER_INTERVAL + Duration::from_millis(60), "a gap: {pair:?}");
        }
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_runs_on_time_while_every_slot_is_busy_with_other_rollouts() {
        // 40 rollouts, each reconcile 300 ms, all triggered every 100 ms: the 8 slots are always
        // full. The one that fails must still be retried when its error asked, every time.
        let names: Vec<String> = (0..40).map(|i| format!("busy-{i}")).collect();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("late");
        let refs: Vec<ObjectRef<ModelRollout>> = names.iter().map(|n| ObjectRef::from_obj(&rollout(n))).collect();
        let storm = futures::stream::iter(0..100)
            .then(move |_| {
                let refs = refs.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    futures::stream::iter(refs)
                }
            })
            .flatten()
            .boxed();
        let pushed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = pushed.clone();
        let fail = move |n: &str| n == "late" && !p.load(std::sync::atomic::Ordering::SeqCst);
        let stop = CancellationToken::new();
        let (log, task) = run(&all, storm, fail, Duration::from_millis(300), Duration::from_secs(1), stop.clone());
        tokio::time::sleep(Duration::from_secs(6)).await;
        pushed.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let t = times(&log, "late");
        // Its turn comes after the rollouts due before it: 41 of them through 8 slots of 300 ms is
        // 1.6 s; with the 1 s retry and its own 300 ms, about 3 s between two reconciles.
        let bound = Duration::from_secs(1) + Duration::from_millis(300) * (41_u32.div_ceil(8) + 2);
        assert!(t.len() >= 3, "retried every few seconds: {t:?}");
        for pair in t.windows(2) {
            assert!(pair[1] - pair[0] <= bound, "a retry came late or never: {pair:?}");
        }
        let last_end = *t.last().unwrap() + Duration::from_millis(300);
        assert!(last_end >= Duration::from_secs(6), "and until one finished after the push: {t:?}");
        stop.cancel();
        task.await.unwrap();
    }
}
