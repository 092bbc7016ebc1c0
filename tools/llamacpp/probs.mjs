// node probs.mjs MODEL.gguf LORA.gguf|- "[ids]" OUT.json [full|next]: llama.cpp's (CPU) next-token
// probabilities after each token, all of them (full) or, per position, that of the text's next
// token and the most likely token (next); tools/llamacpp_check.py compares them with PEFT's.
import {getLlama} from "node-llama-cpp";
import fs from "node:fs";
const [modelPath, loraPath, idsJson, outPath, mode = "full"] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const ids = JSON.parse(idsJson);
const size = 64 * Math.ceil((ids.length + 1) / 64);
const context = await model.createContext({contextSize: size, batchSize: size,
    ...(loraPath !== "-" ? {lora: {adapters: [{filePath: loraPath, scale: 1}]}} : {})});
const res = await context.getSequence().controlledEvaluate(
    ids.map(t => [t, {generateNext: {probabilities: true}}]));
const out = res.map((r, i) => {
    const probs = r.next.probabilities;
    if (mode === "full") return Object.fromEntries(probs);
    const [top] = probs.entries().next().value;
    return {next: i + 1 < ids.length ? (probs.get(ids[i + 1]) ?? 0) : null, top};
});
fs.writeFileSync(outPath, JSON.stringify(out));
console.log("ok", out.length);
