// The official MCP TypeScript SDK's WebSocket transport against a token
// gateway (run by tests/mcp.rs): node --experimental-websocket ws_client.mjs URL TOKEN
//
// The SDK opens `new WebSocket(url, "mcp")` and takes no headers, so the
// token goes where a browser can put it: a `bearer.TOKEN` entry beside
// `mcp` in the offered subprotocols. This wrapper is the whole recipe (the
// README's "MCP" section shows it).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { WebSocketClientTransport } from "@modelcontextprotocol/sdk/client/websocket.js";

const [url, token] = process.argv.slice(2);
const Base = globalThis.WebSocket;
globalThis.WebSocket = class extends Base {
  constructor(address, protocols) {
    super(address, [...[protocols ?? []].flat(), `bearer.${token}`]);
  }
};

const client = new Client({ name: "hivegate-ts-test", version: "1.0.0" });
await client.connect(new WebSocketClientTransport(new URL(url)));
const tools = await client.listTools();
const result = await client.callTool({
  name: "chat",
  arguments: { messages: [{ role: "user", content: "hi" }] },
});
console.log(JSON.stringify({
  tools: tools.tools.map((t) => t.name),
  text: result.content?.[0]?.text ?? null,
  isError: result.isError ?? false,
}));
await client.close();
