//! The `chat` tool as both transports list it: the op protocol's
//! `list_tools` and MCP's `tools/list` give the same name, description and
//! input schema, built here once.

use super::Llm;
use crate::json::JsonOut;

impl Llm {
    /// The `list_tools_res` frame.
    pub fn list_tools(&self, rid: Option<&str>) -> String {
        JsonOut::op("list_tools_res")
            .opt_str("request_id", rid)
            .raw("tools", &format!("[{}]", self.chat_tool()))
            .finish()
    }

    /// The `chat` tool as both transports list it (the op protocol's
    /// `list_tools`, MCP's `tools/list`): name, description, input schema.
    pub fn chat_tool(&self) -> String {
        let mut names = String::from("[\"auto\"");
        for p in &self.providers {
            names.push(',');
            crate::json::escape_into(&mut names, &p.cfg.name);
        }
        names.push(']');
        let message = JsonOut::new()
            .str("type", "object")
            .raw("required", r#"["role","content"]"#)
            .raw(
                "properties",
                r#"{"role":{"type":"string","enum":["system","user","assistant","tool"]},"content":{"type":"string"},"tool_call_id":{"type":"string"}}"#,
            )
            .finish();
        let messages = JsonOut::new()
            .str("type", "array")
            .str("description", "The conversation, oldest first.")
            .num("minItems", 1)
            .raw("items", &message)
            .finish();
        let provider = JsonOut::new()
            .str("type", "string")
            .raw("enum", &names)
            .str(
                "description",
                "A provider's name, or auto for the fallback chain.",
            )
            .finish();
        let properties = JsonOut::new()
            .raw("messages", &messages)
            .raw("provider", &provider)
            .raw(
                "model",
                r#"{"type":["string","null"],"description":"Overrides the provider's model."}"#,
            )
            .raw(
                "stream",
                r#"{"type":"boolean","description":"Send the answer in parts as it comes (the default)."}"#,
            )
            .finish();
        let schema = JsonOut::new()
            .str("type", "object")
            .raw("required", r#"["messages"]"#)
            .raw("properties", &properties)
            .finish();
        JsonOut::new()
            .str("name", "chat")
            .str(
                "description",
                "Ask an LLM. The gateway tries its providers in order (fallback chain, circuit \
                 breakers, retries); provider auto uses the chain. The answer streams as chunks \
                 (or, over MCP, as progress notifications when a progressToken is given).",
            )
            .raw("inputSchema", &schema)
            .finish()
    }
}
