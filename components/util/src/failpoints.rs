//! Failpoints: set at start from the `FAILPOINTS` environment variable
//! (`name=action;name=action`, the `fail` crate's syntax) and at run time through the
//! status server (`PUT /fail/<name>` with the action as body, `DELETE /fail/<name>`).
//!
//! Failpoints compile to nothing unless the `failpoints` feature is on;
//! [`enabled`] tells which build this is, so tests never pass vacuously.

/// Whether this build evaluates failpoints.
pub fn enabled() -> bool {
    fail::has_failpoints()
}

/// Applies `FAILPOINTS` from the environment. Returns the names set.
pub fn setup_from_env() -> Result<Vec<String>, String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(vec![]);
    };
    let mut names = vec![];
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, action) = part
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS entry {part:?} is not name=action"))?;
        set(name.trim(), action.trim())?;
        names.push(name.trim().to_string());
    }
    Ok(names)
}

pub fn set(name: &str, action: &str) -> Result<(), String> {
    if !enabled() {
        return Err("this binary was built without the `failpoints` feature".into());
    }
    fail::cfg(name, action)
}

pub fn remove(name: &str) {
    fail::remove(name);
}

pub fn list() -> Vec<(String, String)> {
    fail::list()
}
