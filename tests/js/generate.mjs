// Greedy generation with an image through transformers.js (Node), for tests/test_transformers_js.py.
// usage: node generate.mjs EXPORT_DIR IMAGE PROMPT MAX_NEW_TOKENS DUMP_DIR
// Prints one JSON line {"input_ids": [...], "tokens": [...], "arrays": {name: {dims, type}}} and
// writes each processor output as DUMP_DIR/<name>.bin (raw little-endian). Local files only.
import fs from 'node:fs';
import path from 'node:path';
import { env, AutoProcessor, AutoModelForImageTextToText, RawImage } from '@huggingface/transformers';

const [folder, imagePath, prompt, maxNewTokens, dumpDir] = process.argv.slice(2);
env.allowRemoteModels = false;
// transformers.js drops the leading "/" of an absolute id: give it the parent folder instead.
env.localModelPath = path.dirname(path.resolve(folder)) + path.sep;
const id = path.basename(path.resolve(folder));

const processor = await AutoProcessor.from_pretrained(id);
const model = await AutoModelForImageTextToText.from_pretrained(id, { dtype: 'fp32', device: 'cpu' });
const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: prompt }] }];
const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
const image = await RawImage.read(imagePath);
// LlavaProcessor takes (images, text); the others (text, images).
const inputs = processor.constructor.name === 'LlavaProcessor'
    ? await processor(image, text) : await processor(text, image);
const arrays = {};
for (const [name, tensor] of Object.entries(inputs)) {
    if (!tensor?.dims) continue;
    arrays[name] = { dims: tensor.dims, type: tensor.type };
    fs.writeFileSync(path.join(dumpDir, `${name}.bin`), Buffer.from(tensor.data.buffer));
}
// eos_token_id []: never stop early, as the PyTorch reference.
const output = await model.generate({
    ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false, eos_token_id: [],
});
const promptLength = inputs.input_ids.dims.at(-1);
const ids = output.tolist()[0].map(Number);
console.log(JSON.stringify({ input_ids: ids.slice(0, promptLength), tokens: ids.slice(promptLength), arrays }));
