//! Key permissions, matched as etcd matches them (`server/auth/range_perm_cache.go`).
//!
//! A permission is on a key (`range_end` empty: that key alone), a range `[key, range_end)`,
//! or every key from `key` on (`range_end` = `"\0"`). etcdctl's `--prefix` sends the prefix's
//! range (`range_end` = the prefix with its last byte plus one), `--from-key` sends `"\0"`.
//! A user's permissions are the union of its roles' ones:
//!
//! - a request for **one key** (`range_end` empty) is allowed if some permission contains it;
//! - a request for a **range** is allowed if the union of the permissions covers all of it
//!   (an open-ended request, `"\0"`, needs an open-ended cover).

use atoll_proto::authpb::permission::Type as PermType;
use atoll_proto::authpb::Permission;

/// A half-open interval of keys: `[start, end)`, `end` `None` for no end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

/// The interval of a permission or request in etcd's form.
pub fn interval(key: &[u8], range_end: &[u8]) -> Interval {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        Interval {
            start: key.to_vec(),
            end: Some(end),
        }
    } else if range_end == [0] {
        Interval {
            start: key.to_vec(),
            end: None,
        }
    } else {
        Interval {
            start: key.to_vec(),
            end: Some(range_end.to_vec()),
        }
    }
}

/// etcd's `isValidPermissionRange`: a key must be given; a range must not be empty or
/// inverted, unless it is open-ended.
pub fn valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || key < range_end || range_end == [0])
}

/// One user's merged read and write permissions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Perms {
    read: Vec<Interval>,
    write: Vec<Interval>,
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Perms {
    /// The union of `perms`.
    pub fn merge<'a>(perms: impl IntoIterator<Item = &'a Permission>) -> Perms {
        let mut p = Perms::default();
        for perm in perms {
            let i = interval(&perm.key, &perm.range_end);
            match PermType::try_from(perm.perm_type) {
                Ok(PermType::Read) => p.read.push(i),
                Ok(PermType::Write) => p.write.push(i),
                Ok(PermType::Readwrite) => {
                    p.read.push(i.clone());
                    p.write.push(i);
                }
                Err(_) => {}
            }
        }
        for list in [&mut p.read, &mut p.write] {
            list.sort_by(|a, b| a.start.cmp(&b.start));
        }
        p
    }

    /// Whether `access` to `key` (`range_end` empty), `[key, range_end)` or everything from
    /// `key` on (`range_end` = `"\0"`) is allowed.
    pub fn allows(&self, access: Access, key: &[u8], range_end: &[u8]) -> bool {
        let list = match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        };
        if range_end.is_empty() {
            return list.iter().any(|i| contains(i, key));
        }
        let want = interval(key, range_end);
        if want.end.as_ref().is_some_and(|e| *e <= want.start) {
            // An empty or inverted range reads nothing: as etcd's interval tree, which
            // treats it as the point at its start.
            return list.iter().any(|i| contains(i, key));
        }
        covers(list, &want)
    }
}

fn contains(i: &Interval, key: &[u8]) -> bool {
    i.start.as_slice() <= key && i.end.as_ref().is_none_or(|e| key < e.as_slice())
}

/// Whether the union of `list` (sorted by start) covers `want`.
fn covers(list: &[Interval], want: &Interval) -> bool {
    // The smallest key not covered yet; `None` once everything is.
    let mut at: Vec<u8> = want.start.clone();
    for i in list {
        if i.start > at {
            break;
        }
        match &i.end {
            None => return true,
            Some(e) if *e > at => at = e.clone(),
            Some(_) => {}
        }
        if want.end.as_ref().is_some_and(|we| at >= *we) {
            return true;
        }
    }
    match &want.end {
        None => false,
        Some(we) => at >= *we,
    }
}

/// The range etcdctl sends for `--prefix` on `prefix` (etcd's `GetPrefixRangeEnd`): the prefix
/// with its last byte below 0xff plus one, what follows dropped; `"\0"` if there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: PermType, key: &str, end: &[u8]) -> Permission {
        Permission {
            perm_type: t as i32,
            key: key.as_bytes().to_vec(),
            range_end: end.to_vec(),
        }
    }

    #[test]
    fn key_permission() {
        let p = Perms::merge(&[perm(PermType::Read, "foo", b"")]);
        assert!(p.allows(Access::Read, b"foo", b""));
        assert!(!p.allows(Access::Read, b"foo0", b""));
        assert!(!p.allows(Access::Read, b"fo", b""));
        assert!(!p.allows(Access::Write, b"foo", b""), "read is not write");
        // The range of just that key.
        assert!(p.allows(Access::Read, b"foo", b"foo\0"));
        assert!(!p.allows(Access::Read, b"foo", b"foo\0\0"));
    }

    #[test]
    fn prefix_permission() {
        let end = prefix_end(b"/a/");
        assert_eq!(end, b"/a0");
        let p = Perms::merge(&[perm(PermType::Readwrite, "/a/", &end)]);
        assert!(p.allows(Access::Read, b"/a/x", b""));
        assert!(p.allows(Access::Write, b"/a/x", b""));
        assert!(p.allows(Access::Read, b"/a/", &prefix_end(b"/a/")));
        assert!(p.allows(Access::Read, b"/a/x/", &prefix_end(b"/a/x/")));
        assert!(!p.allows(Access::Read, b"/b/x", b""));
        assert!(!p.allows(Access::Read, b"/", &prefix_end(b"/")));
        assert!(
            !p.allows(Access::Read, b"/a/", b"\0"),
            "open-ended needs an open-ended cover"
        );
        assert!(!p.allows(Access::Read, b"/a", b""));
    }

    #[test]
    fn ranges_cover_as_a_union() {
        let p = Perms::merge(&[
            perm(PermType::Read, "a", b"c"),
            perm(PermType::Read, "c", b"e"),
            perm(PermType::Read, "x", b""),
        ]);
        assert!(p.allows(Access::Read, b"a", b"e"));
        assert!(p.allows(Access::Read, b"b", b"d"));
        assert!(!p.allows(Access::Read, b"a", b"f"));
        assert!(!p.allows(Access::Read, b"0", b"b"));
        // A gap between two ranges.
        let q = Perms::merge(&[
            perm(PermType::Read, "a", b"c"),
            perm(PermType::Read, "d", b"e"),
        ]);
        assert!(!q.allows(Access::Read, b"a", b"e"));
        assert!(!q.allows(Access::Read, b"c", b""));
    }

    #[test]
    fn open_ended() {
        let p = Perms::merge(&[perm(PermType::Write, "k", b"\0")]);
        assert!(p.allows(Access::Write, b"k", b"\0"));
        assert!(p.allows(Access::Write, b"z", b"\0"));
        assert!(p.allows(Access::Write, b"zzz", b""));
        assert!(p.allows(Access::Write, b"k", b"zz"));
        assert!(!p.allows(Access::Write, b"j", b"\0"));
        assert!(!p.allows(Access::Read, b"k", b""));
        // Everything: the root role's permission.
        let all = Perms::merge(&[perm(PermType::Readwrite, "", b"\0")]);
        assert!(all.allows(Access::Read, b"\0", b"\0"));
        assert!(all.allows(Access::Read, b"", b"\0"));
    }

    #[test]
    fn empty_or_inverted_request_ranges() {
        let p = Perms::merge(&[perm(PermType::Read, "a", b"b")]);
        assert!(p.allows(Access::Read, b"a", b"a"));
        assert!(!p.allows(Access::Read, b"z", b"a"));
    }

    #[test]
    fn permission_ranges_are_checked() {
        assert!(valid_permission_range(b"a", b""));
        assert!(valid_permission_range(b"a", b"b"));
        assert!(valid_permission_range(b"a", b"\0"));
        assert!(!valid_permission_range(b"", b""));
        assert!(!valid_permission_range(b"b", b"a"));
        assert!(!valid_permission_range(b"a", b"a"));
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
