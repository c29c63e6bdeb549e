/*
 * The recovery page (/recover/{token}): confirms the failed PaymentIntent on-session, with the saved
 * card or a new one (3-D Secure if the bank asks), then asks the server to apply what Stripe reports.
 * A file rather than an inline script: the page's Content-Security-Policy runs no inline script.
 * Reads its data (publishable key, client secret, amount) from the JSON block #page-data.
 */
(function () {
  var data = JSON.parse(document.getElementById('page-data').textContent);
  var stripe = Stripe(data.publishable_key);
  var result = document.getElementById('result');
  var buttons = Array.prototype.slice.call(document.querySelectorAll('button'));
  function busy(on) { buttons.forEach(function (b) { b.disabled = on; }); }
  function show(kind, text) { result.className = kind; result.textContent = text; }
  function finish(stripeResult) {
    show('info', 'Confirming your payment…');
    return fetch(window.location.pathname + '/complete', {
      method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}', credentials: 'same-origin'
    }).then(function (resp) { return resp.json(); }).then(function (body) {
      if (body.error) { show('error', body.error.message); return false; }
      if (body.paid) {
        var text = 'Thank you: your payment of ' + data.amount_display + ' is complete.';
        if (body.new_card) text += ' Your card ending in ' + body.new_card.last4 + ' is saved for your subscription.';
        show('ok', text);
        return true;
      }
      if (body.busy || body.charge_status === 'processing') {
        show('info', 'Your payment is being processed. You will get an email when it is complete.');
        return true;
      }
      var message = body.error_message || (stripeResult.error && stripeResult.error.message) ||
        'The payment did not go through.';
      show('error', 'The payment did not go through: ' + message);
      return false;
    }, function () { show('error', 'We could not reach the server. Please try again.'); return false; });
  }
  var paySaved = document.getElementById('pay-saved');
  if (paySaved) {
    paySaved.addEventListener('click', function () {
      busy(true);
      // The same PaymentIntent, confirmed on-session with the saved card: the bank can now ask the
      // customer to authenticate (https://docs.stripe.com/payments/save-and-reuse).
      stripe.confirmCardPayment(data.client_secret, {payment_method: data.saved_payment_method})
        .then(finish).then(function (done) { busy(done); });
    });
  }
  var card = stripe.elements().create('card');
  card.mount('#card-element');
  document.getElementById('option-new').addEventListener('submit', function (event) {
    event.preventDefault();
    busy(true);
    // Saved for later off-session charges while it pays what is owed
    // (https://docs.stripe.com/payments/save-during-payment).
    stripe.confirmCardPayment(data.client_secret, {payment_method: {card: card}, setup_future_usage: 'off_session'})
      .then(finish).then(function (done) { busy(done); });
  });
})();
