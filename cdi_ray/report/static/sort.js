document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.getAttribute('aria-sort')!=='ascending';
  t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var rows=Array.prototype.slice.call(t.tBodies[0].rows);
  rows.sort(function(a,b){
   var x=a.cells[i].getAttribute('data-sort'),y=b.cells[i].getAttribute('data-sort');
   var nx=parseFloat(x),ny=parseFloat(y),c;
   if(!isNaN(nx)&&!isNaN(ny)){c=nx-ny}else if(isNaN(nx)!==isNaN(ny)){c=isNaN(nx)?1:-1;return c}else{c=String(x).localeCompare(String(y))}
   return asc?c:-c});
  rows.forEach(function(r){t.tBodies[0].appendChild(r)});
 })})});
// index.html#sort=3 sorts by the 4th column on load (#sort=3- descending): shareable views
var m=location.hash.match(/^#sort=(\d+)(-?)$/),th=m&&document.querySelectorAll('table.sortable th')[+m[1]];
if(th){th.click();if(m[2])th.click()}
