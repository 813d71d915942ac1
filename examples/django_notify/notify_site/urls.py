"""The example's URLs: POST /rooms/<room>/notify sends the request body to that room."""

from django.urls import path

from notifications import views

urlpatterns = [path("rooms/<str:room>/notify", views.notify)]
