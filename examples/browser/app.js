// Segment an image in the browser with a SAM 2 exported by `sam2-peft export`, through transformers.js.
// Everything comes from this page's server: the export folder (`?model=`, default `model/`), transformers.js and
// onnxruntime-web from node_modules (npm ci); nothing from the Hub or a CDN.
import { AutoProcessor, RawImage, Sam2Model, env } from '@huggingface/transformers';

const params = new URLSearchParams(location.search);
const here = new URL('./', location.href).href;
env.allowLocalModels = true;
env.allowRemoteModels = false;
env.localModelPath = here;
const ortDist = `${here}node_modules/onnxruntime-web/dist/`;
env.backends.onnx.wasm.wasmPaths = {
  mjs: `${ortDist}ort-wasm-simd-threaded.asyncify.mjs`,
  wasm: `${ortDist}ort-wasm-simd-threaded.asyncify.wasm`,
};

const canvas = document.querySelector('#canvas');
const context = canvas.getContext('2d');
const status = document.querySelector('#status');
const result = document.querySelector('#result');
const showError = (error) => {
  status.textContent = `Error: ${error}`;
  result.dataset.error = String(error?.stack ?? error);
};
window.addEventListener('error', (event) => showError(event.error ?? event.message));
window.addEventListener('unhandledrejection', (event) => showError(event.reason));

const modelId = params.get('model') ?? 'model';
const model = await Sam2Model.from_pretrained(modelId, { dtype: 'fp32', device: 'wasm' });
const processor = await AutoProcessor.from_pretrained(modelId);
let image = null; // the RawImage shown
let inputs = null; // its processor outputs (sizes) and image embeddings, computed once per image

async function openImage(url) {
  status.textContent = 'Encoding the image...';
  image = await RawImage.fromURL(url);
  canvas.width = image.width;
  canvas.height = image.height;
  context.drawImage(image.toCanvas(), 0, 0);
  const processed = await processor(image);
  inputs = { ...processed, ...(await model.get_image_embeddings(processed)) };
  status.textContent = 'Click the object, or drag a box around it.';
}

// One prompt in image pixels: {point: [x, y]} or {box: [x0, y0, x1, y1]}; draws and returns the mask logits.
async function segment(prompt) {
  status.textContent = 'Segmenting...';
  const sizes = [inputs.original_sizes, inputs.reshaped_input_sizes];
  const encoded = prompt.point
    ? { input_points: processor.reshape_input_points([[[prompt.point]]], ...sizes) }
    : { input_boxes: processor.reshape_input_points([[prompt.box]], ...sizes, true) };
  if (prompt.point) encoded.input_labels = processor.image_processor.add_input_labels([[[1]]], encoded.input_points);
  const outputs = await model({ ...inputs, ...encoded });
  const [logits] = await processor.post_process_masks(outputs.pred_masks, ...sizes, { binarize: false });
  const scores = Array.from(outputs.iou_scores.data);
  const best = scores.indexOf(Math.max(...scores)); // of SAM 2's three masks (or the single one)
  const pixels = image.width * image.height;
  const mask = logits.data.slice(best * pixels, (best + 1) * pixels);
  draw(mask);
  // The result for scripts and tests: the score and the mask logits at the image's size (base64 float32).
  result.dataset.score = scores[best];
  let bytes = '';
  for (const byte of new Uint8Array(mask.buffer)) bytes += String.fromCharCode(byte);
  result.dataset.logits = btoa(bytes);
  result.textContent = `${JSON.stringify(prompt)}: score ${scores[best].toFixed(3)}, ${mask.filter((v) => v > 0).length} pixels`;
  status.textContent = 'Click the object, or drag a box around it.';
  return mask;
}

function draw(mask) {
  context.drawImage(image.toCanvas(), 0, 0);
  const overlay = context.getImageData(0, 0, image.width, image.height);
  mask.forEach((logit, i) => {
    if (logit > 0) overlay.data.set([30, 144, 255, 255], 4 * i);
  });
  context.putImageData(overlay, 0, 0);
}

// A click (press and release in place) is a point prompt; a drag is a box.
let pressed = null;
const imagePoint = (event) => {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * (canvas.width / rect.width), (event.clientY - rect.top) * (canvas.height / rect.height)];
};
canvas.addEventListener('pointerdown', (event) => (pressed = imagePoint(event)));
canvas.addEventListener('pointerup', (event) => {
  if (!pressed || !inputs) return;
  const [x, y] = imagePoint(event);
  const [x0, y0] = pressed;
  pressed = null;
  const moved = Math.hypot(x - x0, y - y0) > 4;
  segment(moved ? { box: [Math.min(x, x0), Math.min(y, y0), Math.max(x, x0), Math.max(y, y0)] } : { point: [x, y] });
});
document.querySelector('#file').addEventListener('change', (event) => {
  openImage(URL.createObjectURL(event.target.files[0]));
});

// ?image=URL opens an image; then ?click=x,y or ?box=x0,y0,x1,y1 (image pixels) segments it once.
if (params.has('image')) {
  await openImage(params.get('image'));
  const numbers = (name) => params.get(name).split(',').map(Number);
  if (params.has('click')) await segment({ point: numbers('click') });
  if (params.has('box')) await segment({ box: numbers('box') });
} else {
  status.textContent = 'Choose an image.';
}
document.body.dataset.ready = 'true';
