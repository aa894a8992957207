// Build prompts with @mlc-ai/web-llm's own Conversation code, for the Python tests of the
// conv_template that edgesmith derives (tests/exporters/test_webllm_chat_config.py).
//
// web-llm's bundle (lib/index.js) keeps Conversation internal. This script copies the bundle
// verbatim into a temporary module and appends one export line for the internal functions the
// engine itself uses (getConversationFromChatCompletionRequest, Role), so the prompt comes from
// web-llm's code, not from a re-implementation. The bundle has no imports and loads in node.
//
// stdin:  {"conv_template": {...}, "conversations": [[{role, content}, ...], ...]}
// stdout: [{"prefix_token_ids": [...], "prompts": ["...", ...]}, ...]
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(import.meta.url);
const pkgDir = dirname(require.resolve("@mlc-ai/web-llm/package.json"));
const pkg = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
const bundle = readFileSync(join(pkgDir, pkg.main), "utf8");
const INTERNALS = ["getConversationFromChatCompletionRequest", "Role"];
for (const name of INTERNALS) {
  if (!new RegExp(`^(function|var|class|const|let) ${name}\\b`, "m").test(bundle)) {
    throw new Error(`@mlc-ai/web-llm ${pkg.version}: ${name} is not a top-level name of ${pkg.main}`);
  }
}

const dir = mkdtempSync(join(tmpdir(), "webllm-conv-"));
let webllm;
try {
  const file = join(dir, "web-llm-internals.mjs");
  writeFileSync(file, `${bundle}\nexport { ${INTERNALS.join(", ")} };\n`);
  webllm = await import(pathToFileURL(file).href);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

const input = JSON.parse(readFileSync(0, "utf8"));
const chatConfig = { conv_template: input.conv_template, conv_config: input.conv_config };
const out = input.conversations.map((messages) => {
  // What MLCEngine does for a chat completion: the history (system message included) ...
  const conv = webllm.getConversationFromChatCompletionRequest({ messages }, chatConfig, false);
  // ... then the last user message and the assistant reply header (forwardPrefill)
  const last = messages[messages.length - 1];
  conv.appendMessage(webllm.Role[last.role], last.content, last.name);
  conv.appendReplyHeader(webllm.Role.assistant);
  return {
    prefix_token_ids: conv.config.system_prefix_token_ids ?? [],
    prompts: conv.getPromptArray(chatConfig),
    stop_str: conv.getStopStr(),
    stop_token_ids: conv.getStopTokens(),
  };
});
process.stdout.write(JSON.stringify({ version: pkg.version, results: out }));
