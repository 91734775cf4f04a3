//! The process-wide Prometheus registry. Components register their metrics here at first use
//! (`lazy` statics) and the status server encodes it for `/metrics`.

pub use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};
use prometheus::{Encoder, TextEncoder};
use std::sync::OnceLock;

pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::new)
}

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // A duplicate registration (two stores in one test process) keeps the first; both
    // handles count into their own collector, so per-store figures come from store-scoped
    // counters (see raftstore::metrics), not from this registry.
    let _ = registry().register(Box::new(c.clone()));
    c
}

pub fn int_counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

pub fn int_counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

pub fn int_gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

pub fn int_gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

pub fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid metric"),
    )
}

/// Latency buckets from 50µs to ~13s, in seconds.
pub fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.00005, 2.0, 19).expect("valid buckets")
}

/// Everything registered, in the Prometheus text format.
pub fn encode_text() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry().gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Declares a lazily-registered metric: `metric!(static NAME: IntCounter = int_counter("n", "h"));`
#[macro_export]
macro_rules! metric {
    ($(#[$m:meta])* static $name:ident : $ty:ty = $ctor:ident($($arg:expr),* $(,)?) $(;)?) => {
        $(#[$m])*
        pub static $name: std::sync::LazyLock<$ty> =
            std::sync::LazyLock::new(|| $crate::metrics::$ctor($($arg),*));
    };
}
