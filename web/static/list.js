fetch('/api/queue/jobs').then(r => r.json()).then(({ items }) => {
  const ul = document.getElementById('jobs');
  for (const job of items) {
    const li = document.createElement('li');
    const a = document.createElement('a');
    a.href = '/jobs/' + job.id;
    a.textContent = (job.name || job.id) + ' — ' + job.status;
    li.append(a);
    ul.append(li);
  }
});
