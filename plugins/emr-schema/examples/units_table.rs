//! Prints the Markdown table of accepted unit spellings, generated from
//! `UNIT_RULES`, for plugins/README.md (between the `units-table` markers):
//!   cargo run --manifest-path plugins/Cargo.toml -p oxbox-emr-schema --example units_table

fn main() {
    print!("{}", oxbox_emr_schema::units_table_markdown());
}
