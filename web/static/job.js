const id = location.pathname.split('/').pop();
const out = document.getElementById('output');
const es = new EventSource('/api/queue/jobs/' + id + '/events/stream');
es.addEventListener('queue_event', (e) => { out.textContent += JSON.parse(e.data).message + '\n'; });
es.addEventListener('end', () => es.close());
