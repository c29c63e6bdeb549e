/*
 * Starts Swagger UI on /docs over the app's own /openapi.json. A file rather than the usual inline
 * initializer: the page's Content-Security-Policy runs no inline script.
 */
(function () {
  var root = document.getElementById('swagger-ui');
  window.ui = SwaggerUIBundle({
    url: root.getAttribute('data-openapi-url'),
    dom_id: '#swagger-ui',
    presets: [SwaggerUIBundle.presets.apis],
    layout: 'BaseLayout',
  });
})();
