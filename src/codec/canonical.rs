//! Parsing Canonical Form and CRC-64-AVRO fingerprints exactly as the Avro specification
//! defines them ("Parsing Canonical Form for Schemas" and "Schema Fingerprints").
//!
//! Written by hand because the `apache-avro` crate (0.22) gets the canonical form wrong for
//! schemas with logical types: it keeps `{"type":"long","logicalType":"timestamp-millis"}` as
//! `{"type":"long"}` where the specification strips it to `"long"` (AVRO-4004), so its
//! fingerprints differ from Apache Avro Java's and fastavro's and single-object events do not
//! interoperate. The rules, applied to the schema's JSON:
//! - [PRIMITIVES] a primitive written as an object (`{"type":"int", ...}`) becomes its name;
//! - [FULLNAMES] names of records, enums and fixed, and references to them, become full names;
//! - [STRIP] only `type, name, fields, symbols, items, values, size` are kept (docs, aliases,
//!   defaults, logical types, order and any other attribute go); [ORDER] in that order;
//! - [STRINGS]/[INTEGERS]/[WHITESPACE] JSON strings as they are, integers without leading zeros
//!   or signs, no whitespace outside strings.
//!
//! The test vectors come from fastavro (`scripts/fixtures/avro_vectors.py`, at setup), never from
//! this code.

use serde_json::Value;

use super::CodecError;

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, CodecError> {
    let value: Value = serde_json::from_str(schema_json).map_err(|e| CodecError::Schema(format!("not JSON: {e}")))?;
    let mut out = String::with_capacity(schema_json.len());
    write_schema(&value, "", &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (Rabin) fingerprint of the canonical form, as the u64 whose little-endian bytes
/// follow `C3 01` in single-object encoding.
pub fn rabin_fingerprint(canonical: &str) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        t
    });
    canonical.bytes().fold(EMPTY, |fp, b| (fp >> 8) ^ table[((fp ^ b as u64) & 0xff) as usize])
}

/// Spec-conformant fingerprint of a schema given as JSON text.
pub fn schema_fingerprint(schema_json: &str) -> Result<u64, CodecError> {
    Ok(rabin_fingerprint(&parsing_canonical_form(schema_json)?))
}

fn bad(msg: impl Into<String>) -> CodecError {
    CodecError::Schema(msg.into())
}

/// A name's full name and the namespace it defines for what it encloses.
fn full_name(name: &str, namespace: Option<&str>, enclosing: &str) -> (String, String) {
    if let Some(dot) = name.rfind('.') {
        return (name.to_string(), name[..dot].to_string());
    }
    let ns = namespace.unwrap_or(enclosing);
    if ns.is_empty() { (name.to_string(), String::new()) } else { (format!("{ns}.{name}"), ns.to_string()) }
}

fn push_json_string(s: &str, out: &mut String) {
    out.push_str(&Value::String(s.to_string()).to_string());
}

fn write_schema(schema: &Value, namespace: &str, out: &mut String) -> Result<(), CodecError> {
    match schema {
        Value::String(name) => {
            if PRIMITIVES.contains(&name.as_str()) {
                push_json_string(name, out);
            } else {
                push_json_string(&full_name(name, None, namespace).0, out);
            }
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, branch) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(branch, namespace, out)?;
            }
            out.push(']');
        }
        Value::Object(obj) => {
            let kind = obj.get("type").ok_or_else(|| bad("a schema object without \"type\""))?;
            let Value::String(kind) = kind else {
                // {"type": {...}} or {"type": [...]}: the object only wraps another schema
                return write_schema(kind, namespace, out);
            };
            match kind.as_str() {
                "record" | "error" | "enum" | "fixed" => {
                    let name = obj.get("name").and_then(Value::as_str).ok_or_else(|| bad(format!("a {kind} without a name")))?;
                    let (full, inner_ns) = full_name(name, obj.get("namespace").and_then(Value::as_str), namespace);
                    out.push_str("{\"name\":");
                    push_json_string(&full, out);
                    out.push_str(",\"type\":");
                    push_json_string(if kind == "error" { "error" } else { kind }, out);
                    match kind.as_str() {
                        "enum" => {
                            let symbols = obj.get("symbols").and_then(Value::as_array).ok_or_else(|| bad(format!("enum {full} without symbols")))?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                push_json_string(s.as_str().ok_or_else(|| bad(format!("enum {full}: a symbol is not a string")))?, out);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = obj.get("size").and_then(Value::as_u64).ok_or_else(|| bad(format!("fixed {full} without a size")))?;
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                        _ => {
                            let fields = obj.get("fields").and_then(Value::as_array).ok_or_else(|| bad(format!("record {full} without fields")))?;
                            out.push_str(",\"fields\":[");
                            for (i, field) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname = field.get("name").and_then(Value::as_str).ok_or_else(|| bad(format!("record {full}: a field without a name")))?;
                                let ftype = field.get("type").ok_or_else(|| bad(format!("field {full}.{fname} without a type")))?;
                                out.push_str("{\"name\":");
                                push_json_string(fname, out);
                                out.push_str(",\"type\":");
                                write_schema(ftype, &inner_ns, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write_schema(obj.get("items").ok_or_else(|| bad("an array without items"))?, namespace, out)?;
                    out.push('}');
                }
                "map" => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write_schema(obj.get("values").ok_or_else(|| bad("a map without values"))?, namespace, out)?;
                    out.push('}');
                }
                // [PRIMITIVES] (whatever else the object says: logicalType, precision, ...) and
                // references to named types written as {"type": "Name"}
                other => write_schema(&Value::String(other.to_string()), namespace, out)?,
            }
        }
        other => return Err(bad(format!("not a schema: {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's own examples of stripping and full names.
    #[test]
    fn canonical_form_follows_the_specification_rules() {
        let cases = [
            (r#""int""#, r#""int""#),
            (r#"{"type": "long", "logicalType": "timestamp-millis"}"#, r#""long""#),
            (r#"{"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}"#, r#""bytes""#),
            (
                r#"{"type":"record","name":"R","namespace":"a.b","doc":"x","aliases":["Q"],
                    "fields":[{"name":"f","type":{"type":"array","items":"R"},"default":[],"doc":"d"},
                              {"name":"e","type":{"type":"enum","name":"c.E","symbols":["A","B"],"default":"A"}},
                              {"name":"g","type":{"type":"fixed","name":"F","size":16}},
                              {"name":"h","type":["null",{"type":"map","values":"c.E"}]},
                              {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#,
                r#"{"name":"a.b.R","type":"record","fields":[{"name":"f","type":{"type":"array","items":"a.b.R"}},{"name":"e","type":{"name":"c.E","type":"enum","symbols":["A","B"]}},{"name":"g","type":{"name":"a.b.F","type":"fixed","size":16}},{"name":"h","type":["null",{"type":"map","values":"c.E"}]},{"name":"t","type":"long"}]}"#,
            ),
        ];
        for (schema, canonical) in cases {
            assert_eq!(parsing_canonical_form(schema).unwrap(), canonical, "{schema}");
        }
    }

    /// The specification's CRC-64-AVRO of the primitive "int" and the empty-input constant.
    #[test]
    fn rabin_of_known_inputs() {
        // Avro's test vectors (share/test/data/schema-tests.txt): "int" → 0x7275d51a3f395c8f
        // (printed there as the signed long 8247732601305521295), "null" → 0x63dd24e7cc258f8a.
        assert_eq!(rabin_fingerprint("\"int\"") as i64, 8247732601305521295);
        assert_eq!(rabin_fingerprint("\"null\""), 7195948357588979594u64);
        assert_eq!(rabin_fingerprint(""), 0xc15d_213a_a4d7_a795);
    }
}
