// node probs.mjs MODEL.gguf LORA.gguf|- "[ids]" OUT.json: llama.cpp's next-token probabilities after each
// token (CPU, no GPU); tools/llamacpp_check.py compares them with PEFT's.
import {getLlama} from "node-llama-cpp";
import fs from "node:fs";
const [modelPath, loraPath, idsJson, outPath] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 256, batchSize: 256,
    ...(loraPath !== "-" ? {lora: {adapters: [{filePath: loraPath, scale: 1}]}} : {})});
const seq = context.getSequence();
const ids = JSON.parse(idsJson);
const res = await seq.controlledEvaluate(ids.map(t => [t, {generateNext: {probabilities: true}}]));
const out = res.map(r => Object.fromEntries(r.next.probabilities));
fs.writeFileSync(outPath, JSON.stringify(out));
console.log("ok", out.length);
