//! [`SingleFlight`]: concurrent identical calls share one execution.
//!
//! When a popular room fills up (a broadcast starts, a reconnect storm after a deploy), every
//! client asks for the same newest page at the same moment. Without coalescing that is N
//! identical store reads; with it, the first caller starts the read and everyone arriving
//! while it is in flight waits for the same result. Nothing is cached afterwards: the next
//! call after completion reads again, so results are never staler than one read.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

type Flights<K, V> = Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>;

pub struct SingleFlight<K, V> {
    // A std Mutex: held only to look up or insert, never across an await.
    flights: Flights<K, V>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f()` unless a call with the same `key` is in flight, in which case it waits for
    /// that call's result instead. `f` is called at most once per flight.
    ///
    /// The work runs in its own task: a caller that gives up (a closed HTTP request) neither
    /// cancels it for the others nor leaves a half-done flight behind.
    pub async fn run<F, Fut>(&self, key: K, f: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(&key) {
                Some(flight) => flight.clone(),
                None => {
                    let done = Landing {
                        flights: self.flights.clone(),
                        key: Some(key.clone()),
                    };
                    let work = f();
                    let task = tokio::spawn(async move {
                        let _done = done;
                        work.await
                    });
                    let flight = async move {
                        match task.await {
                            Ok(v) => v,
                            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                            Err(e) => panic!("single-flight task cancelled: {e}"),
                        }
                    }
                    .boxed()
                    .shared();
                    flights.insert(key, flight.clone());
                    flight
                }
            }
        };
        flight.await
    }

    /// Keys with a call in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Removes a flight from the map when its work finishes (or panics), so the next call starts
/// a fresh one.
struct Landing<K: Hash + Eq, V> {
    flights: Flights<K, V>,
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
    }
}
