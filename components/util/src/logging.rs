//! Logging: `tracing` everywhere, configured once per process; raft-rs logs through `slog`,
//! bridged here into `tracing` so that nothing is printed twice.

use std::fmt::Write as _;

/// Installs a `tracing` subscriber writing to stderr. `RUST_LOG` overrides `default_filter`.
/// Safe to call more than once (later calls do nothing).
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}

/// A slog drain that forwards raft-rs records to `tracing` under the `raft` target.
pub struct SlogToTracing;

struct KvCollector(String);

impl slog::Serializer for KvCollector {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        let mut kv = KvCollector(String::new());
        let _ = slog::KV::serialize(values, record, &mut kv);
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{msg}{}", kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug | slog::Level::Trace => {
                tracing::trace!(target: "raft", "{msg}{}", kv.0)
            }
        }
        Ok(())
    }
}

/// The slog logger to hand to raft-rs, with the ids that identify the group.
pub fn raft_logger(
    kv: slog::OwnedKV<impl slog::SendSyncRefUnwindSafeKV + 'static>,
) -> slog::Logger {
    slog::Logger::root(SlogToTracing, kv)
}
