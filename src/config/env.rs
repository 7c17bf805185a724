//! `SLUICEGATE_*` environment overrides, applied to the parsed TOML before it is typed.
//!
//! `SLUICEGATE_SERVER__LISTEN=0.0.0.0:8080` sets `server.listen`; `__` separates path
//! segments, a numeric segment indexes an array (`SLUICEGATE_ROUTES__0__FUNCTION=other`). A
//! value is read as a TOML value when it parses as one (`10`, `true`,
//! `{ rate = 5.0, burst = 10 }`) and as a string otherwise; when the key already holds a
//! string in the file the value always stays a string. Variables without `__` (such as
//! `SLUICEGATE_CONFIG`) are not overrides.

use super::ConfigError;

/// Parses TOML text and applies the environment overrides onto it.
pub(super) fn parse_with_env(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<toml::Value, ConfigError> {
    let mut value = text
        .parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
    apply_env_overrides(&mut value, env)?;
    Ok(value)
}

/// Applies `SLUICEGATE_A__B__C=value` overrides onto the parsed file.
fn apply_env_overrides(
    root: &mut toml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SLUICEGATE_") && k.contains("__"))
        .collect();
    // Deterministic order: parents before children, so `ROUTES__0` then `ROUTES__0__NAME`.
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var["SLUICEGATE_".len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty path segment".to_owned(),
            });
        }
        set_path(root, &path, &raw).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
    }
    Ok(())
}

fn set_path(root: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    let mut node = root;
    for (depth, segment) in path.iter().enumerate() {
        let last = depth + 1 == path.len();
        let slot: &mut toml::Value = match node {
            toml::Value::Table(table) => {
                if !last && !table.contains_key(segment) {
                    table.insert(segment.clone(), toml::Value::Table(Default::default()));
                }
                if last {
                    let keep_string = matches!(table.get(segment), Some(toml::Value::String(_)))
                        || STRING_KEYS.contains(&segment.as_str());
                    table.insert(segment.clone(), env_value(raw, keep_string));
                    return Ok(());
                }
                table.get_mut(segment).expect("inserted above when missing")
            }
            toml::Value::Array(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| format!("`{segment}` is not an array index"))?;
                if index > items.len() {
                    return Err(format!(
                        "array index {index} skips entries (the array has {})",
                        items.len()
                    ));
                }
                if index == items.len() {
                    items.push(toml::Value::Table(Default::default()));
                }
                if last {
                    let keep_string = matches!(items[index], toml::Value::String(_));
                    items[index] = env_value(raw, keep_string);
                    return Ok(());
                }
                &mut items[index]
            }
            _ => return Err(format!("`{}` is not a table", path[..depth].join("."))),
        };
        node = slot;
    }
    Ok(())
}

/// Keys whose value is text whatever it looks like: an override `SLUICEGATE_..._ADMIN_TOKEN=
/// 12345678` is the token "12345678", not a number that fails to load (and would put the
/// secret in the error message).
const STRING_KEYS: [&str; 13] = [
    "admin_token",
    "admin_token_file",
    "redis_url",
    "endpoint_url",
    "sqs_queue_url",
    "file",
    "region",
    "name",
    "function",
    "path",
    "header",
    "listen",
    "admin_listen",
];

fn env_value(raw: &str, keep_string: bool) -> toml::Value {
    if !keep_string {
        if let Ok(mut table) = format!("v = {raw}").parse::<toml::Table>() {
            if let Some(value) = table.remove("v") {
                return value;
            }
        }
    }
    toml::Value::String(raw.to_owned())
}
