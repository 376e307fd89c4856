"""The page `GET /` serves: a form to pick or drop photos; each is posted to /caption and shown with its
caption, n-best and scores. No external resources: it works on a machine with no internet."""

PAGE = """<!doctype html>
<html lang=en>
<head>
<meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>captioner</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 960px; padding: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 10px; }
#drop { border: 2px dashed #9ab; border-radius: 8px; padding: 24px; text-align: center; background: #f6f9fb; }
#drop.over { background: #e3eef7; border-color: #357; }
.options { margin-top: 10px; color: #444; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; margin-top: 16px; }
.result { border-radius: 6px; box-shadow: 0 1px 3px #0003; overflow: hidden; background: #fff; }
.result img { display: block; width: 100%; height: 200px; object-fit: cover; background: #eee; }
.result .text { padding: 8px 10px; }
.caption { font-weight: 600; font-size: 16px; margin: 0 0 4px; }
.error { color: #a22; font-weight: 600; }
ol { margin: 4px 0 0; padding-left: 20px; color: #444; } .score { color: #888; font-size: 12px; }
.name { color: #888; font-size: 12px; }
</style>
</head>
<body>
<h1>captioner</h1>
<form id=upload action="/caption" method=post enctype="multipart/form-data">
  <div id=drop>
    <p>Drop photos here, or <label><input id=image type=file name=image accept="image/*" multiple></label></p>
    <p class=name>up to {{MAX_MB}} MB each; nothing is stored</p>
  </div>
  <div class=options>
    <label>beam size <input id=beam_size name=beam_size type=number min=1 max={{MAX_BEAM}} value={{BEAM}}></label>
    <label>n-best <input id=n_best name=n_best type=number min=1 max={{MAX_BEAM}} value=3></label>
    <noscript><button type=submit>caption</button></noscript>
  </div>
</form>
<section id=results aria-live=polite></section>
<script>
const input = document.getElementById('image'), drop = document.getElementById('drop');
const results = document.getElementById('results');
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function captionOne(file) {
  const card = el('article', 'result'), img = el('img'), text = el('div', 'text');
  img.src = URL.createObjectURL(file); img.alt = file.name;
  const status = el('p', 'caption pending', 'captioning\\u2026');
  text.append(status, el('div', 'name', file.name));
  card.append(img, text);
  results.prepend(card);
  const beam = Math.max(1, parseInt(document.getElementById('beam_size').value) || {{BEAM}});
  const nBest = Math.min(beam, Math.max(1, parseInt(document.getElementById('n_best').value) || 1));
  const form = new FormData();
  form.append('image', file, file.name);
  form.append('beam_size', beam);
  form.append('n_best', nBest);
  try {
    const answer = await fetch('caption', {method: 'POST', body: form});
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error || answer.statusText);
    status.className = 'caption';
    status.textContent = body.caption;
    if (body.confidence != null) {
      text.insertBefore(el('p', 'score confidence', 'confidence ' + body.confidence.toFixed(2)), text.lastChild);
    }
    if (body.n_best.length > 1) {
      const list = el('ol', 'nbest');
      for (const h of body.n_best) {
        const item = el('li', null, h.caption + ' ');
        item.append(el('span', 'score', h.score.toFixed(2)));
        list.append(item);
      }
      text.insertBefore(list, text.lastChild);
    }
  } catch (err) {
    status.className = 'error';
    status.textContent = 'error: ' + err.message;
  }
}
function captionAll(files) { for (const f of files) captionOne(f); }
document.getElementById('upload').addEventListener('submit', e => { e.preventDefault(); captionAll(input.files); });
input.addEventListener('change', () => { captionAll(input.files); });
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); captionAll(e.dataTransfer.files); });
</script>
</body>
</html>
"""
